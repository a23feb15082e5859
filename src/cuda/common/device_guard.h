// DeviceGuard lives in cuda/common/host.h with the other host helpers of the CUDA entry points;
// this header stays for the files that include it by this name (src/cuda/quantize/api.cu).
#pragma once

#include "cuda/common/host.h"
