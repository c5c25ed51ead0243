;; test/static (0): a value placed by a data segment on page 4. The module's memory import asks for
;; 5 pages; a host that created a smaller memory could not instantiate it.
(data (i32.const 262160) "\11\00\00\00{\"from\":\"page 4\"}")
(func $evaluate (param $entrypoint i32) (param $input i32) (param $data i32) (result i32)
  (if (local.get $entrypoint) (then (call $invalid_entrypoint) (unreachable)))
  (i32.const 262160))
