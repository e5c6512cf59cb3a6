# Sanitizer and fuzzer builds, included once from the top-level CMakeLists.txt after the options
# and before any target, so the flags below reach every target of the tree (library, CPU kernel
# objects, tests, examples, benchmarks): add_compile_options / add_link_options are directory
# properties that every target created afterwards in this directory and below inherits.
#
#   -DSYNCBN_SANITIZE=address,undefined  ASan + UBSan; UBSan findings abort (no recovery).
#                                        tests/run_sanitized.sh runs the ctest suite so.
#   -DSYNCBN_SANITIZE=thread             TSan. Use clang with LLVM's libomp and the archer OMPT
#                                        tool (OMP_TOOL_LIBRARIES=.../libarcher.so): GCC's libgomp
#                                        is not instrumented and TSan misreads its barriers.
#                                        tests/run_sanitized.sh thread runs the single-process
#                                        suite so.
#   -DSYNCBN_FUZZ=ON                     clang only: the whole tree with
#                                        -fsanitize=fuzzer-no-link,address,undefined and the
#                                        libFuzzer target tests/fuzz (fuzz_c_api, linked with
#                                        -fsanitize=fuzzer). tests/run_fuzz.sh builds and runs it.
# Only C and C++ get the flags: nvcc does not take them (CUDA builds keep their .cu code as is).
set(SYNCBN_SANITIZE "" CACHE STRING
    "Sanitizers for every target: empty/OFF, \"address,undefined\" or \"thread\"")
set_property(CACHE SYNCBN_SANITIZE PROPERTY STRINGS "" OFF "address,undefined" "thread")
option(SYNCBN_FUZZ "Build the libFuzzer target tests/fuzz (clang; implies ASan + UBSan)" OFF)

set(_syncbn_sanitize "${SYNCBN_SANITIZE}")
if(_syncbn_sanitize MATCHES "^(OFF|off|Off|NO|no|0|FALSE|false)$")
  set(_syncbn_sanitize "")
endif()
string(REPLACE " " "" _syncbn_sanitize "${_syncbn_sanitize}")
if(_syncbn_sanitize STREQUAL "undefined,address")
  set(_syncbn_sanitize "address,undefined")
endif()
if(NOT _syncbn_sanitize MATCHES "^(|address,undefined|thread)$")
  message(FATAL_ERROR "SYNCBN_SANITIZE=${SYNCBN_SANITIZE}: expected empty, OFF, "
                      "\"address,undefined\" or \"thread\"")
endif()

set(_syncbn_san_compile "")
set(_syncbn_san_link "")
if(SYNCBN_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang" OR NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "SYNCBN_FUZZ needs clang and clang++ (libFuzzer): configure with "
                        "CC=clang CXX=clang++")
  endif()
  if(_syncbn_sanitize STREQUAL "thread")
    message(FATAL_ERROR "SYNCBN_FUZZ builds with ASan + UBSan; it cannot be combined with "
                        "SYNCBN_SANITIZE=thread")
  endif()
  # Everything is instrumented for coverage (fuzzer-no-link) and checked by ASan + UBSan; only
  # the fuzz target links libFuzzer itself (SYNCBN_FUZZER_FLAGS, tests/fuzz/CMakeLists.txt).
  set(_syncbn_san_compile -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer
      -fno-sanitize-recover=undefined)
  set(_syncbn_san_link -fsanitize=fuzzer-no-link,address,undefined)
  set(SYNCBN_FUZZER_FLAGS -fsanitize=fuzzer,address,undefined)
elseif(_syncbn_sanitize STREQUAL "address,undefined")
  set(_syncbn_san_compile -fsanitize=address,undefined -fno-omit-frame-pointer
      -fno-sanitize-recover=undefined)
  set(_syncbn_san_link -fsanitize=address,undefined)
elseif(_syncbn_sanitize STREQUAL "thread")
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    message(WARNING "SYNCBN_SANITIZE=thread with GCC: libgomp's synchronization is invisible to "
                    "TSan and gives false reports in the OpenMP kernels; use CC=clang "
                    "CXX=clang++ (LLVM libomp) and OMP_TOOL_LIBRARIES=libarcher.so")
  endif()
  set(_syncbn_san_compile -fsanitize=thread -fno-omit-frame-pointer)
  set(_syncbn_san_link -fsanitize=thread)
endif()

if(_syncbn_san_compile)
  message(STATUS "syncbn: sanitizers: ${_syncbn_san_compile}")
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_syncbn_san_compile}>")
  add_link_options("$<$<LINK_LANGUAGE:C,CXX>:${_syncbn_san_link}>")
endif()
