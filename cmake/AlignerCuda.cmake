# CUDA targets of the kernels. ALIGNER_CUDA_ARCHS is the one list of GPU architectures; each entry the installed nvcc
# supports is compiled once (SASS only, one pass per architecture), the others are dropped with a message.
#   87: Jetson Orin.   90: Hopper.   Thor: sm_101 in CUDA 12.8-12.9, renamed sm_110 from CUDA 13.0; listing both
#   picks whichever the toolkit knows.
set(ALIGNER_CUDA_ARCHS "87;90;101;110" CACHE STRING "GPU architectures for the SteerGate/SteerShift kernels")

function(aligner_supported_cuda_archs out_var)
  execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --list-gpu-arch OUTPUT_VARIABLE _listed ERROR_QUIET
                  RESULT_VARIABLE _rc)
  set(_kept)
  set(_dropped)
  foreach(_arch IN LISTS ALIGNER_CUDA_ARCHS)
    if(_rc EQUAL 0 AND _listed MATCHES "compute_${_arch}([^0-9]|$)")
      list(APPEND _kept "${_arch}-real")
    else()
      list(APPEND _dropped "sm_${_arch}")
    endif()
  endforeach()
  if(_dropped)
    message(STATUS "inferaligner: nvcc ${CMAKE_CUDA_COMPILER_VERSION} does not support ${_dropped}; skipped those architectures")
  endif()
  set(${out_var} "${_kept}" PARENT_SCOPE)
endfunction()
