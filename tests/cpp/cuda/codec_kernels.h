// tests/cpp/cuda/codec_kernels.h — host wrappers that run the device codec
// (src/cuda/common/codec.cuh) on the GPU for the codec tests (test_codec_cuda.cpp). Each wrapper
// copies its inputs to the device, runs one kernel, synchronizes and copies the results back;
// CUDA errors throw std::runtime_error (GoogleTest reports them as failures).
#pragma once

#include <cstdint>
#include <vector>

namespace attnqat::cuda_test {

// Per input y: the results of every E2M1 entry point of the device codec.
struct E2M1Results {
  std::vector<float> round_sw;         // e2m1_round_sw(y)
  std::vector<float> round;            // e2m1_round(y) (hardware convert on sm_100a/sm_120a)
  std::vector<float> round_abs_sw;     // e2m1_round_abs_sw(|y|)
  std::vector<float> round_abs;        // e2m1_round_abs(|y|)
  std::vector<uint8_t> encode;         // e2m1_encode(y)
  std::vector<float> decode_of_encode;  // e2m1_decode(e2m1_encode(y))
};
E2M1Results e2m1_on_device(const std::vector<float>& y);

// e2m1_pack8_sw and e2m1_pack8 of consecutive groups of 8 values (y.size() % 8 == 0).
void e2m1_pack8_on_device(const std::vector<float>& y, std::vector<uint32_t>& packed_sw,
                          std::vector<uint32_t>& packed);

// Every finite fp32 bit pattern (both signs, 2^32 - 2^24 values) through the device E2M1 entry
// points, compared on the device with a literal transcription of the spec table (the
// comparisons of the reference's e2m1_magnitude_code; the test checks that transcription
// against the host reference separately). Returns the mismatch count and up to 16 failing inputs.
struct SweepResult {
  uint64_t checked = 0;
  uint64_t mismatches = 0;
  std::vector<uint32_t> examples;  // input bit patterns
  std::vector<uint32_t> checks;    // which check failed (bit mask, see codec_kernels.cu)
};
SweepResult e2m1_sweep_all_fp32();
// The spec-table transcription used by the sweep, on the device, for a few inputs (its code).
std::vector<uint8_t> spec_e2m1_code_on_device(const std::vector<float>& y);

std::vector<float> e4m3_decode_on_device(const std::vector<uint8_t>& bytes);
std::vector<uint8_t> e4m3_encode_on_device(const std::vector<float>& t);
std::vector<float> e8m0_decode_on_device(const std::vector<uint8_t>& codes);

// Block scale of NVFP4 for (amax, g) pairs: the E4M3 byte, the quotient t = RN(a / RN(6g)) and
// inv = RN(1 / RN(s*g)) of nv_block_scale(), and the fast quotient.
struct NvScaleResults {
  std::vector<float> quotient;       // nv_scale_quotient(a, g)
  std::vector<float> quotient_fast;  // nv_scale_quotient_fast(a, 6g, RN(1/(6g)))
  std::vector<uint8_t> s_bits;       // nv_block_scale(a, g).s_bits
  std::vector<float> inv;            // nv_block_scale(a, g).inv
};
NvScaleResults nv_scale_on_device(const std::vector<float>& amax, const std::vector<float>& g);

// rcp_rn(d) and rcp_rn_fast(d).
void rcp_on_device(const std::vector<float>& d, std::vector<float>& ieee, std::vector<float>& fast);

// Every fp32 a in [0, 1] (bit patterns 0 .. 0x3F800000): the E4M3 byte of the fast quotient
// against the byte of the IEEE quotient (all a), and the quotients' bits (where the fast one's
// domain says they agree: a >= 2^-124 and a/(6g) >= 2^-126). g a power of two.
struct QuotientSweep {
  uint64_t checked = 0;
  uint64_t byte_mismatches = 0;
  uint64_t bit_mismatches = 0;
  std::vector<uint32_t> examples;
};
QuotientSweep fast_quotient_sweep(float g);

std::vector<float> global_scale_on_device(const std::vector<float>& amax);         // float version
std::vector<float> global_scale_from_bits_on_device(const std::vector<uint32_t>& bits);
std::vector<uint8_t> mx_scale_code_on_device(const std::vector<float>& amax);

// Name of the device (for messages) and whether the E2M1 hardware convert path was compiled for
// it (sm_100a / sm_120a).
bool device_uses_hw_e2m1();

}  // namespace attnqat::cuda_test
