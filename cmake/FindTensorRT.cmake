# Finds the TensorRT headers and, separately, libnvinfer.
#
# Inputs (cache or command line): TensorRT_ROOT (an install prefix with include/ and lib/), TensorRT_INCLUDE_DIR
# (a directory holding NvInferVersion.h). Without them the usual JetPack and Debian-package paths are searched.
#
# Outputs: TensorRT_FOUND (headers found), TensorRT_INCLUDE_DIR, TensorRT_VERSION (from NvInferVersion.h),
# TensorRT_LIBRARY_FOUND, TensorRT_LIBRARY (libnvinfer), TensorRT_REASON (why something is missing, one line).

set(_trt_include_hints)
set(_trt_lib_hints)
if(TensorRT_ROOT)
  list(APPEND _trt_include_hints "${TensorRT_ROOT}/include")
  list(APPEND _trt_lib_hints "${TensorRT_ROOT}/lib" "${TensorRT_ROOT}/lib64" "${TensorRT_ROOT}/targets/${CMAKE_SYSTEM_PROCESSOR}-linux/lib")
endif()
if(DEFINED ENV{TensorRT_ROOT})
  list(APPEND _trt_include_hints "$ENV{TensorRT_ROOT}/include")
  list(APPEND _trt_lib_hints "$ENV{TensorRT_ROOT}/lib")
endif()
# JetPack installs TensorRT as Debian packages under the multiarch directories.
set(_trt_system_includes /usr/include/aarch64-linux-gnu /usr/include/x86_64-linux-gnu /usr/local/tensorrt/include
    /usr/include)
set(_trt_system_libs /usr/lib/aarch64-linux-gnu /usr/lib/x86_64-linux-gnu /usr/local/tensorrt/lib /usr/lib)

if(NOT TensorRT_INCLUDE_DIR)
  find_path(TensorRT_INCLUDE_DIR NvInferVersion.h HINTS ${_trt_include_hints} PATHS ${_trt_system_includes})
endif()

set(TensorRT_FOUND FALSE)
set(TensorRT_LIBRARY_FOUND FALSE)
set(TensorRT_VERSION "")
if(TensorRT_INCLUDE_DIR AND EXISTS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h")
  file(READ "${TensorRT_INCLUDE_DIR}/NvInferVersion.h" _trt_version_h)
  # TensorRT 11 defines NV_TENSORRT_MAJOR through TRT_MAJOR_ENTERPRISE; 10.x defines it directly.
  foreach(_part MAJOR MINOR PATCH BUILD)
    set(_value "")
    if(_trt_version_h MATCHES "#define TRT_${_part}_ENTERPRISE ([0-9]+)")
      set(_value "${CMAKE_MATCH_1}")
    elseif(_trt_version_h MATCHES "#define NV_TENSORRT_${_part} ([0-9]+)")
      set(_value "${CMAKE_MATCH_1}")
    endif()
    set(TensorRT_VERSION_${_part} "${_value}")
  endforeach()
  set(TensorRT_VERSION "${TensorRT_VERSION_MAJOR}.${TensorRT_VERSION_MINOR}.${TensorRT_VERSION_PATCH}")
  if(NOT EXISTS "${TensorRT_INCLUDE_DIR}/NvInferRuntime.h")
    set(TensorRT_REASON "NvInferVersion.h found in ${TensorRT_INCLUDE_DIR} but not NvInferRuntime.h")
  elseif(TensorRT_VERSION_MAJOR LESS 10)
    set(TensorRT_REASON "TensorRT ${TensorRT_VERSION} headers in ${TensorRT_INCLUDE_DIR}; IPluginV3 needs 10.0 or later")
  else()
    set(TensorRT_FOUND TRUE)
  endif()
else()
  set(TensorRT_REASON "no TensorRT headers (NvInferVersion.h); set TensorRT_ROOT or TensorRT_INCLUDE_DIR")
endif()

if(TensorRT_FOUND)
  get_filename_component(_trt_prefix "${TensorRT_INCLUDE_DIR}" DIRECTORY)
  find_library(TensorRT_LIBRARY NAMES nvinfer "nvinfer_${TensorRT_VERSION_MAJOR}"
               HINTS ${_trt_lib_hints} "${_trt_prefix}/lib" "${_trt_prefix}/lib64" PATHS ${_trt_system_libs})
  if(TensorRT_LIBRARY)
    set(TensorRT_LIBRARY_FOUND TRUE)
  else()
    set(TensorRT_REASON "TensorRT ${TensorRT_VERSION} headers in ${TensorRT_INCLUDE_DIR} but no libnvinfer")
  endif()
endif()
