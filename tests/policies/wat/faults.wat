;; Entrypoints that go wrong the ways a policy module can:
;;   test/abort (0)      opa_abort with a message
;;   test/trap (1)       unreachable
;;   test/loop (2)       never returns
;;   test/println (3)    opa_println, then the input
;;   test/bad_json (4)   a result that is not JSON
;;   test/recurse (5)    unbounded recursion (call stack exhausted)
(data (i32.const 8192) "policy gave up: the answer is not 42\00")
(data (i32.const 8256) "hello from the policy\00")
(data (i32.const 8320) "\07\00\00\00{\"oops\"")

(func $recurse (param $depth i32) (result i32)
  (i32.add (call $recurse (i32.add (local.get $depth) (i32.const 1))) (i32.const 1)))

(func $evaluate (param $entrypoint i32) (param $input i32) (param $data i32) (result i32)
  (block $unknown
    (block $recurse
      (block $bad_json
        (block $println
          (block $loop
            (block $trap
              (block $abort
                (br_table $abort $trap $loop $println $bad_json $recurse $unknown (local.get $entrypoint)))
              (call $opa_abort (i32.const 8192))
              (unreachable))
            (unreachable))
          (loop $forever (br $forever))
          (unreachable))
        (call $opa_println (i32.const 8256))
        (return (local.get $input)))
      (return (i32.const 8320)))
    (return (call $recurse (i32.const 0))))
  (call $invalid_entrypoint)
  (unreachable))
