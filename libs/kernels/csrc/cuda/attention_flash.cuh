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

// Prefill over KV caches (attentionForward's addressing), one block per (tile, head).
struct CacheArgs {
  const float* q;
  const float* kCache;
  const float* vCache;
  float* out;
  AttentionTiles tiles;  // device arrays
  int nh, nkv, hd;
  float scale;
};

// nullptr when the flash kernels take this call (headDim 32/64/128, 16-byte aligned inputs — q, k, v,
// dout are read as float4; outputs are written by element —, enough
// shared memory per block on the current device), else why not.
// (backward: the backward kernels' shared memory, else the forward's).
const char* unsupportedReason(const AttentionShape& s, int64_t B, int64_t T, bool backward,
                              std::initializer_list<const void*> ptrs);
void prefill(const CacheArgs& a, Stream stream);             // out of the tiles' tokens
void trainForward(const Args& a, int64_t B, Stream stream);   // out, lse
void trainBackward(const Args& a, int64_t B, Stream stream);  // dq, dk, dv (D computed by the caller)

}  // namespace qk::cuda::flash
