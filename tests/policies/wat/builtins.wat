;; Built-ins called through env.opa_builtin0..4 with the ids this module's builtins() assigns
;; (see BUILTIN_IDS in wat_modules.py; deliberately neither sequential nor alphabetical):
;;   test/sprintf (0)   sprintf("%s scored %d", input)      opa_builtin2, id 7
;;   test/is_valid (1)  json.is_valid(input)                opa_builtin1, id 3
;;   test/answer (2)    custom.answer()                     opa_builtin0, id 9
;;   test/triple (3)    custom.triple(input, input, input)  opa_builtin3, id 5
;;   test/sum4 (4)      custom.sum4(input x4)               opa_builtin4, id 1
;;   test/nothing (5)   custom.nothing(input), undefined    opa_builtin1, id 2
;;   test/unlisted (6)  an id builtins() does not list       opa_builtin1, id 42
(data (i32.const 8192) "\0e\00\00\00\"%s scored %d\"")
(func $evaluate (param $entrypoint i32) (param $input i32) (param $data i32) (result i32)
  (block $unknown
    (block $unlisted
      (block $nothing
        (block $sum4
          (block $triple
            (block $answer
              (block $is_valid
                (block $sprintf
                  (br_table $sprintf $is_valid $answer $triple $sum4 $nothing $unlisted $unknown (local.get $entrypoint)))
                (return (call $opa_builtin2 (i32.const 7) (i32.const 0) (i32.const 8192) (local.get $input))))
              (return (call $opa_builtin1 (i32.const 3) (i32.const 0) (local.get $input))))
            (return (call $opa_builtin0 (i32.const 9) (i32.const 0))))
          (return (call $opa_builtin3 (i32.const 5) (i32.const 0) (local.get $input) (local.get $input) (local.get $input))))
        (return (call $opa_builtin4 (i32.const 1) (i32.const 0)
          (local.get $input) (local.get $input) (local.get $input) (local.get $input))))
      (return (call $opa_builtin1 (i32.const 2) (i32.const 0) (local.get $input))))
    (return (call $opa_builtin1 (i32.const 42) (i32.const 0) (local.get $input))))
  (call $invalid_entrypoint)
  (unreachable))
