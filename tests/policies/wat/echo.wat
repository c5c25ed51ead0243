;; Entrypoints: test/echo (0) is the input, test/data (1) the data document, test/undefined (2)
;; has no value.
(func $evaluate (param $entrypoint i32) (param $input i32) (param $data i32) (result i32)
  (block $unknown
    (block $undefined
      (block $data_document
        (block $echo
          (br_table $echo $data_document $undefined $unknown (local.get $entrypoint)))
        (return (local.get $input)))
      (return (local.get $data)))
    (return (i32.const 0)))
  (call $invalid_entrypoint)
  (unreachable))
