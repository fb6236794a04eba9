// Internal interface of the tensor-core flash attention kernels (attention_flash.cu) for attention.cu,
// which chooses between them and the SIMT kernels (qk_cuda.h: AttentionKernel).
#pragma once
#include <cstdint>
#include <initializer_list>

#include "cuda/qk_cuda.h"

namespace qk::cuda::flash {

// Device pointers and shape of one training attention call (tokens i = b·T + t; q/out/dout/dq
// [N, nh·hd], k/v/dk/dv [N, nkv·hd], lse/D [N, nh], start [N]).
struct Args {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* start;
  float* out;        // forward
  float* lse;        // forward: written; backward: read
  const float* dout;  // backward
  const float* D;     // backward: D[i, h] = dout_i·out_i
  float* dq;
  float* dk;
  float* dv;
  int nh, nkv, hd;
  float scale;
  int64_t T;
};

// nullptr when the flash kernels take this call (headDim 32/64/128, 16-byte aligned inputs — q, k, v,
// dout are read as float4; outputs are written by element —, enough
// shared memory per block on the current device), else why not.
const char* unsupportedReason(const AttentionShape& s, int64_t B, int64_t T, std::initializer_list<const void*> ptrs);
void trainForward(const Args& a, int64_t B, Stream stream);   // out, lse
void trainBackward(const Args& a, int64_t B, Stream stream);  // dq, dk, dv (D computed by the caller)

}  // namespace qk::cuda::flash
