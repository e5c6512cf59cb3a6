# cmake -DSYNCBN_BINARY_DIR=... -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=... -DLAUNCH=... -P run_consumer_test.cmake
# Installs the built syncbn into WORK_DIR/prefix, then builds the consumer project against that
# install tree only (find_package(syncbn) through CMAKE_PREFIX_PATH) three times, with C and C++,
# with C++ only and with C only, and runs what each built (the MPI consumers on 2 ranks through
# LAUNCH, the launcher of the MPI tests).
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
run(${CMAKE_COMMAND} --install ${SYNCBN_BINARY_DIR} --prefix ${WORK_DIR}/prefix)
foreach(languages IN ITEMS "C,CXX" "CXX" "C")
  string(REPLACE "," "_" name "${languages}")
  set(build ${WORK_DIR}/build_${name})
  message(STATUS "consumer project with LANGUAGES ${languages}")
  run(${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${build} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
      -DCMAKE_BUILD_TYPE=Release "-DCONSUMER_LANGUAGES=${languages}")
  run(${CMAKE_COMMAND} --build ${build})
  set(ran 0)
  foreach(program IN ITEMS consumer_c consumer_cpp)
    if(EXISTS ${build}/${program})
      run(${build}/${program})
      math(EXPR ran "${ran} + 1")
    endif()
    if(EXISTS ${build}/${program}_mpi)
      run(${LAUNCH} -n 2 --threads 1 -- ${build}/${program}_mpi)
      math(EXPR ran "${ran} + 1")
    endif()
  endforeach()
  if(ran EQUAL 0)
    message(FATAL_ERROR "the consumer with LANGUAGES ${languages} built no program")
  endif()
endforeach()
