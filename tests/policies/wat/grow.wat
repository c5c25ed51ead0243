;; test/allocate (0): the input is a whole number of KiB; allocates that much with opa_malloc (which
;; grows memory when the heap runs past its end), writes the last byte, and returns the input.
(func $unsigned (param $value i32) (result i32)
  (local $index i32)
  (local $number i32)
  (local $digit i32)
  (block $done
    (loop $next
      (br_if $done (i32.ge_u (local.get $index) (i32.load (local.get $value))))
      (local.set $digit (i32.sub (i32.load8_u (i32.add (i32.add (local.get $value) (i32.const 4)) (local.get $index))) (i32.const 48)))
      (br_if $done (i32.gt_u (local.get $digit) (i32.const 9)))
      (local.set $number (i32.add (i32.mul (local.get $number) (i32.const 10)) (local.get $digit)))
      (local.set $index (i32.add (local.get $index) (i32.const 1)))
      (br $next)))
  (local.get $number))

(func $evaluate (param $entrypoint i32) (param $input i32) (param $data i32) (result i32)
  (local $size i32)
  (if (local.get $entrypoint) (then (call $invalid_entrypoint) (unreachable)))
  (local.set $size (i32.mul (call $unsigned (local.get $input)) (i32.const 1024)))
  (i32.store8
    (i32.sub (i32.add (call $opa_malloc (local.get $size)) (local.get $size)) (i32.const 1))
    (i32.const 255))
  (local.get $input))
