;; A small runtime with the shape of an OPA-compiled policy module (wasm ABI 1.x), so the host can be
;; tested without the `opa` CLI. It imports and exports what `opa build -t wasm` modules do:
;;   imports  env.memory (its minimum set per test), env.opa_abort, env.opa_println, env.opa_builtin0..4
;;   exports  memory, opa_wasm_abi_version/minor, opa_malloc/free, opa_heap_ptr_get/set,
;;            opa_json_parse/dump, opa_value_parse/dump, builtins, entrypoints, opa_eval_ctx_*, eval,
;;            and (ABI >= 1.2) opa_eval.
;; Values are kept as their JSON text, [i32 length][bytes], which the host never looks inside: it
;; only moves them through opa_json_parse/opa_json_dump, as with real modules. The policy fragment
;; spliced in at the end defines $evaluate(entrypoint, input, data) -> value (0 = undefined).
;; The double-braced placeholders are filled in by tests/policies/wat_modules.py.
(module
  (import "env" "memory" (memory {{MEMORY}}))
  (import "env" "opa_abort" (func $opa_abort (param i32)))
  (import "env" "opa_println" (func $opa_println (param i32)))
  (import "env" "opa_builtin0" (func $opa_builtin0 (param i32 i32) (result i32)))
  (import "env" "opa_builtin1" (func $opa_builtin1 (param i32 i32 i32) (result i32)))
  (import "env" "opa_builtin2" (func $opa_builtin2 (param i32 i32 i32 i32) (result i32)))
  (import "env" "opa_builtin3" (func $opa_builtin3 (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "opa_builtin4" (func $opa_builtin4 (param i32 i32 i32 i32 i32 i32) (result i32)))
  {{EXTRA_IMPORTS}}

  (global $heap_ptr (mut i32) (i32.const {{HEAP_BASE}}))
  (global (export "opa_wasm_abi_version") i32 (i32.const {{ABI_MAJOR}}))
  (global (export "opa_wasm_abi_minor_version") i32 (i32.const {{ABI_MINOR}}))
  (export "memory" (memory 0))

  ;; Static values and strings below the heap.
  {{BUILTINS}}
  {{ENTRYPOINTS}}
  (data (i32.const 3072) "\02\00\00\00[]")
  (data (i32.const 3100) "[{\"result\":")
  (data (i32.const 3120) "}]")
  (data (i32.const 3200) "opa_malloc: out of memory\00")
  (data (i32.const 3240) "internal: illegal entrypoint id\00")
  (data (i32.const 3280) "opa_eval: input is not JSON\00")

  ;; --- Heap: a bump allocator that grows memory itself, like OPA's malloc ---------------------------
  (func $opa_malloc (export "opa_malloc") (param $size i32) (result i32)
    (local $address i32)
    (local $end i32)
    (local.set $address (global.get $heap_ptr))
    (local.set $end (i32.and (i32.add (i32.add (local.get $address) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (if (i32.gt_u (local.get $end) (i32.shl (memory.size) (i32.const 16)))
      (then
        (if (i32.eq
              (memory.grow (i32.sub (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)) (memory.size)))
              (i32.const -1))
          (then (call $opa_abort (i32.const 3200)) (unreachable)))))
    (global.set $heap_ptr (local.get $end))
    (local.get $address))

  (func (export "opa_free") (param $address i32))

  (func (export "opa_heap_ptr_get") (result i32) (global.get $heap_ptr))

  (func (export "opa_heap_ptr_set") (param $address i32) (global.set $heap_ptr (local.get $address)))

  ;; --- Values ------------------------------------------------------------------------------------
  ;; A JSON text starts with one of { [ " t f n - 0-9; anything else is refused with 0, as OPA's
  ;; parser refuses malformed JSON.
  (func $starts_json (param $c i32) (result i32)
    (i32.or
      (i32.or
        (i32.or (i32.eq (local.get $c) (i32.const 123)) (i32.eq (local.get $c) (i32.const 91)))
        (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 116))))
      (i32.or
        (i32.or (i32.eq (local.get $c) (i32.const 102)) (i32.eq (local.get $c) (i32.const 110)))
        (i32.or
          (i32.eq (local.get $c) (i32.const 45))
          (i32.and (i32.ge_u (local.get $c) (i32.const 48)) (i32.le_u (local.get $c) (i32.const 57)))))))

  (func $json_parse (export "opa_json_parse") (param $text i32) (param $length i32) (result i32)
    (local $value i32)
    (if (i32.eqz (local.get $length)) (then (return (i32.const 0))))
    (if (i32.eqz (call $starts_json (i32.load8_u (local.get $text)))) (then (return (i32.const 0))))
    (local.set $value (call $opa_malloc (i32.add (local.get $length) (i32.const 4))))
    (i32.store (local.get $value) (local.get $length))
    (memory.copy (i32.add (local.get $value) (i32.const 4)) (local.get $text) (local.get $length))
    (local.get $value))

  (func $json_dump (export "opa_json_dump") (param $value i32) (result i32)
    (local $length i32)
    (local $text i32)
    (local.set $length (i32.load (local.get $value)))
    (local.set $text (call $opa_malloc (i32.add (local.get $length) (i32.const 1))))
    (memory.copy (local.get $text) (i32.add (local.get $value) (i32.const 4)) (local.get $length))
    (i32.store8 (i32.add (local.get $text) (local.get $length)) (i32.const 0))
    (local.get $text))

  (export "opa_value_parse" (func $json_parse))
  (export "opa_value_dump" (func $json_dump))

  ;; A new value: prefix bytes, the value's text, suffix bytes.
  (func $wrap (param $value i32) (param $prefix i32) (param $prefix_length i32) (param $suffix i32) (param $suffix_length i32) (result i32)
    (local $length i32)
    (local $out i32)
    (local.set $length (i32.load (local.get $value)))
    (local.set $out (call $opa_malloc
      (i32.add (i32.const 4) (i32.add (local.get $length) (i32.add (local.get $prefix_length) (local.get $suffix_length))))))
    (i32.store (local.get $out) (i32.add (local.get $length) (i32.add (local.get $prefix_length) (local.get $suffix_length))))
    (memory.copy (i32.add (local.get $out) (i32.const 4)) (local.get $prefix) (local.get $prefix_length))
    (memory.copy
      (i32.add (local.get $out) (i32.add (i32.const 4) (local.get $prefix_length)))
      (i32.add (local.get $value) (i32.const 4))
      (local.get $length))
    (memory.copy
      (i32.add (local.get $out) (i32.add (i32.const 4) (i32.add (local.get $prefix_length) (local.get $length))))
      (local.get $suffix)
      (local.get $suffix_length))
    (local.get $out))

  ;; The result set: [] when undefined, [{"result": <value>}] otherwise.
  (func $result_set (param $value i32) (result i32)
    (if (i32.eqz (local.get $value)) (then (return (i32.const 3072))))
    (call $wrap (local.get $value) (i32.const 3100) (i32.const 11) (i32.const 3120) (i32.const 2)))

  (func $invalid_entrypoint
    (call $opa_abort (i32.const 3240)))

  (func (export "builtins") (result i32) (i32.const 1024))
  (func (export "entrypoints") (result i32) (i32.const 2048))

  ;; --- Evaluation: the context API (ABI 1.0) ---------------------------------------------------------
  ;; A context is 16 bytes: input, data, entrypoint, result.
  (func (export "opa_eval_ctx_new") (result i32)
    (local $context i32)
    (local.set $context (call $opa_malloc (i32.const 16)))
    (memory.fill (local.get $context) (i32.const 0) (i32.const 16))
    (local.get $context))
  (func (export "opa_eval_ctx_set_input") (param $context i32) (param $value i32)
    (i32.store (local.get $context) (local.get $value)))
  (func (export "opa_eval_ctx_set_data") (param $context i32) (param $value i32)
    (i32.store offset=4 (local.get $context) (local.get $value)))
  (func (export "opa_eval_ctx_set_entrypoint") (param $context i32) (param $entrypoint i32)
    (i32.store offset=8 (local.get $context) (local.get $entrypoint)))
  (func (export "opa_eval_ctx_get_result") (param $context i32) (result i32)
    (i32.load offset=12 (local.get $context)))
  (func (export "eval") (param $context i32) (result i32)
    (i32.store offset=12 (local.get $context)
      (call $result_set
        (call $evaluate
          (i32.load offset=8 (local.get $context))
          (i32.load (local.get $context))
          (i32.load offset=4 (local.get $context)))))
    (i32.const 0))

  ;; --- Evaluation: one call (ABI 1.2) ----------------------------------------------------------------
  (func $opa_eval (param $reserved i32) (param $entrypoint i32) (param $data i32) (param $input_text i32)
        (param $input_length i32) (param $heap i32) (param $format i32) (result i32)
    (local $input i32)
    (global.set $heap_ptr (local.get $heap))
    (if (local.get $input_length)
      (then
        (local.set $input (call $json_parse (local.get $input_text) (local.get $input_length)))
        (if (i32.eqz (local.get $input)) (then (call $opa_abort (i32.const 3280)) (unreachable)))))
    (call $json_dump
      (call $result_set (call $evaluate (local.get $entrypoint) (local.get $input) (local.get $data)))))
  {{OPA_EVAL_EXPORT}}

  ;; --- The policy --------------------------------------------------------------------------------
  {{POLICY}}
)
