// Host stand-in for CUDA's cuda_fp16.h (see cuda_host.h).
#pragma once
#include "cuda_host.h"
