;; A bare module with every export an ABI 1.2 host uses, each doing as little as possible, for the
;; malformations runtime.wat cannot express: a result address outside memory, a string that never
;; ends, a start function that traps or never returns, exports or imports of the wrong shape.
;; "Values" here are addresses of NUL-terminated JSON, so opa_json_dump is the identity.
(module
  (import "env" "memory" (memory 1))
  {{EXTRA_IMPORTS}}
  (global (export "opa_wasm_abi_version") i32 (i32.const 1))
  (global (export "opa_wasm_abi_minor_version") i32 (i32.const 2))
  (data (i32.const 16) "{\"test/x\":0}\00")
  (data (i32.const 48) "{}\00")
  (data (i32.const 65530) "abcdef")
  (func $spin (loop $forever (br $forever)))
  (func $boom (unreachable))
  {{START}}
  (func (export "opa_malloc") {{MALLOC_SIGNATURE}} (i32.const 1024))
  (func (export "opa_free") (param i32))
  (func (export "opa_json_parse") (param i32 i32) (result i32) (i32.const 1024))
  (func (export "opa_json_dump") (param $value i32) (result i32) (local.get $value))
  (func (export "opa_heap_ptr_get") (result i32) (i32.const 2048))
  (func (export "opa_heap_ptr_set") (param i32))
  (func (export "builtins") (result i32) (i32.const 48))
  (func (export "entrypoints") (result i32) (i32.const 16))
  (func (export "opa_eval") (param i32 i32 i32 i32 i32 i32 i32) (result i32) {{RESULT}})
)
