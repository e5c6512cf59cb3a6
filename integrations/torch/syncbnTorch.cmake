# syncbn::torch, the libtorch SyncBatchNorm module: included by syncbnConfig.cmake for a consumer
# that asks for the component (find_package(syncbn COMPONENTS torch)) or has found Torch already.
# Finds Torch (libtorch's package: Torch_DIR or CMAKE_PREFIX_PATH) where it is not found yet,
# then imports syncbn::torch from syncbnTorchTargets.cmake, and sets syncbn_torch_FOUND.
# find_package rather than find_dependency: a missing libtorch fails the component torch only
# (check_required_components in syncbnConfig.cmake), never the whole package, so that
# OPTIONAL_COMPONENTS torch leaves syncbn::syncbn usable.
if(NOT TARGET torch)
  find_package(Torch QUIET)
endif()
if(TARGET torch)
  include("${CMAKE_CURRENT_LIST_DIR}/syncbnTorchTargets.cmake")
  set(syncbn_torch_FOUND TRUE)
else()
  set(syncbn_torch_FOUND FALSE)
endif()
