#!/usr/bin/env bash
# The CPU kernels compiled for an instruction set above the baseline (x86-64-v3, -v4) must define
# no weak symbol outside their own namespace (syncbn::cpu::x86_64_vN) in an optimized build: the
# linker keeps one copy of each weak symbol (inline code of std::vector, say) for the whole
# library, and a copy taken from the AVX-512 object would run on CPUs without it. (The library
# also links these objects after its own, so that the baseline's copies win; this keeps the
# kernels from depending on that.) Fails listing any such symbol.
#   tests/check_isa_objects.sh OBJECT_OR_ARCHIVE...   (ctest passes syncbn_kernels_v3 / _v4)
set -euo pipefail
status=0
for obj in "$@"; do
  [[ -f "$obj" ]] || { echo "check_isa_objects: no object $obj" >&2; exit 2; }
  # DW.ref.*: a pointer to the C++ personality routine that exception tables use, no code.
  leaked=$(nm -C --defined-only "$obj" | awk '$2 ~ /^[WVu]$/ { $1 = ""; $2 = ""; print }' |
           grep -v "syncbn::cpu::x86_64_v[0-9]::" | grep -v "^ *DW\.ref\." || true)
  if [[ -n "$leaked" ]]; then
    echo "check_isa_objects: $obj defines weak symbols outside its instruction set's namespace:"
    echo "$leaked"
    status=1
  fi
done
(( status == 0 )) && echo "check_isa_objects: $# object(s), no weak symbol outside their namespace"
exit $status
