// CPU kernels, called from JAX through XLA's FFI: the depthwise conv and
// the per-channel sums of BatchNorm.
//
// Built and registered by dha_jax/nas/cpu_kernels.py; the maths and the
// reasons are in dha_jax/nas/depthwise.py ('ffi'), dha_jax/nas/batch_norm.py
// and docs/design.md.
//
// Depthwise conv. Layouts: x [N, H, W, C] and y [N, H', W', C] row-major (NHWC); the kernel
// w [k, k, C]. With p the padding, s the stride and d the dilation:
//
//   y[n, oy, ox, c]  = Σ_{i,j} xp[n, s·oy + d·i, s·ox + d·j, c] · w[i, j, c]
//   ∂x: ∂xp[n, s·oy + d·i, s·ox + d·j, c] += g[n, oy, ox, c] · w[i, j, c]
//   ∂w[i, j, c]      = Σ_{n,oy,ox} xp[n, s·oy + d·i, s·ox + d·j, c] · g[n, oy, ox, c]
//
// where xp is x with p zeros around H and W. Each image is padded into a
// small scratch buffer (a few tens of KiB, in cache), so the loops have no
// bounds tests. Channels are the minor axis: the loops run over blocks of 8
// channels as one 8-lane vector (GCC/Clang vector extensions), the last
// C mod 8 channels one at a time. Every output vector is accumulated in
// registers over its taps, four outputs at a time, so that four independent
// multiply-add chains hide the latency of each. Images are split over the
// threads of XLA's intra-op pool.
//
// Channel sums. For a, b [M, C] (M = N·H·W rows): Σ_m b[m, c] and
// Σ_m a[m, c]·b[m, c], the reductions of a BatchNorm's statistics (a = b = x)
// and of its backward pass (a = x, b = the cotangent). XLA:CPU reduces over
// the major axes with C minor several times slower than memory allows. Rows
// are summed in float32 vectors over blocks of rows, the blocks' sums in
// double, and the threads' parts in a fixed order.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec8 __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;

template <typename V>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// sums[0, L) += v, in double.
template <typename V, int64_t L>
inline void AddTo(double* sums, V v) {
  float lanes[L];
  std::memcpy(lanes, &v, sizeof(V));
  for (int64_t l = 0; l < L; ++l) sums[l] += static_cast<double>(lanes[l]);
}

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t k;               // kernel size
  int64_t h_out, w_out;    // output
  int64_t stride, dilation, padding;
  int64_t h_pad, w_pad;    // the padded image, large enough for every tap

  int64_t image() const { return h * w * c; }
  int64_t image_out() const { return h_out * w_out * c; }
  int64_t image_pad() const { return h_pad * w_pad * c; }
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, int64_t k,
                      ffi::Span<const int64_t> y, int64_t stride,
                      int64_t dilation, int64_t padding) {
  Geometry g{x[0], x[1], x[2], x[3], k, y[1], y[2], stride, dilation, padding,
             0, 0};
  // Rows a tap reads: up to s·(H' − 1) + d·(k − 1); the padding may be
  // asymmetric in effect when (H + 2p − d(k − 1) − 1) is not a multiple of s.
  g.h_pad = std::max(g.h + 2 * padding,
                     stride * (g.h_out - 1) + dilation * (k - 1) + 1);
  g.w_pad = std::max(g.w + 2 * padding,
                     stride * (g.w_out - 1) + dilation * (k - 1) + 1);
  return g;
}

// out = max(x, 0) for `size` values.
void Relu(const float* __restrict x, float* __restrict out, int64_t size) {
  for (int64_t t = 0; t < size; ++t) out[t] = x[t] > 0.0f ? x[t] : 0.0f;
}

// xp = x padded; with `relu`, max(x, 0) padded.
void PadImage(const float* x, float* xp, const Geometry& g,
              bool relu = false) {
  std::memset(xp, 0, sizeof(float) * g.image_pad());
  for (int64_t y = 0; y < g.h; ++y) {
    float* row = xp + ((y + g.padding) * g.w_pad + g.padding) * g.c;
    const float* in = x + y * g.w * g.c;
    if (relu) {
      Relu(in, row, g.w * g.c);
    } else {
      std::memcpy(row, in, sizeof(float) * g.w * g.c);
    }
  }
}

void CropImage(const float* xp, float* x, const Geometry& g) {
  for (int64_t y = 0; y < g.h; ++y) {
    std::memcpy(x + y * g.w * g.c,
                xp + ((y + g.padding) * g.w_pad + g.padding) * g.c,
                sizeof(float) * g.w * g.c);
  }
}

// dx = 0 where x ≤ 0: the cotangent through a ReLU (whose derivative at 0
// is 0, as JAX's).
void MaskThroughRelu(const float* __restrict x, float* __restrict dx,
                     int64_t size) {
  for (int64_t t = 0; t < size; ++t) dx[t] = x[t] > 0.0f ? dx[t] : 0.0f;
}

// y of one image for the channels [c0, c1) in steps of the lanes of V, for
// any k, stride and dilation: four outputs at a time.
template <typename V, int64_t L>
void CorrelateImageAny(const float* __restrict xp, const float* __restrict w,
                    float* __restrict y, const Geometry& g, int64_t c0,
                    int64_t c1) {
  const int64_t c = g.c, step = g.stride * c, tap_col = g.dilation * c;
  const int64_t tap_row = g.dilation * g.w_pad * c;
  for (int64_t oy = 0; oy < g.h_out; ++oy) {
    const float* row = xp + g.stride * oy * g.w_pad * c;
    float* out = y + oy * g.w_out * c;
    for (int64_t cb = c0; cb < c1; cb += L) {
      int64_t ox = 0;
      for (; ox + 4 <= g.w_out; ox += 4) {
        V a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const float* base = row + g.stride * ox * c + cb;
        for (int64_t i = 0; i < g.k; ++i) {
          for (int64_t j = 0; j < g.k; ++j) {
            const V wv = Load<V>(w + (i * g.k + j) * c + cb);
            const float* q = base + i * tap_row + j * tap_col;
            a0 += Load<V>(q) * wv;
            a1 += Load<V>(q + step) * wv;
            a2 += Load<V>(q + 2 * step) * wv;
            a3 += Load<V>(q + 3 * step) * wv;
          }
        }
        Store<V>(out + ox * c + cb, a0);
        Store<V>(out + (ox + 1) * c + cb, a1);
        Store<V>(out + (ox + 2) * c + cb, a2);
        Store<V>(out + (ox + 3) * c + cb, a3);
      }
      for (; ox < g.w_out; ++ox) {
        V a0 = {};
        const float* base = row + g.stride * ox * c + cb;
        for (int64_t i = 0; i < g.k; ++i) {
          for (int64_t j = 0; j < g.k; ++j) {
            a0 += Load<V>(base + i * tap_row + j * tap_col) *
                  Load<V>(w + (i * g.k + j) * c + cb);
          }
        }
        Store<V>(out + ox * c + cb, a0);
      }
    }
  }
}

// Outputs per block of the kernels below for K taps a row: their
// accumulators, K kernel vectors and one input vector fit in the 16 vector
// registers of AVX2 (14 at K = 5 with 8 outputs, 12 at K = 7 with 4).
template <int64_t K>
constexpr int64_t OutputsPerBlock() { return K <= 5 ? 8 : 4; }

// For a block of O outputs of one row of taps with K taps, stride S and
// dilation D, from input x (C channels apart): loads each input vector the
// block's windows span once, in order, and calls fn(x_t, o, j) for every
// output o whose window holds it as tap j (t = S·o + D·j). The loops unroll
// into straight code.
template <typename V, int64_t K, int64_t S, int64_t D, int64_t O, typename Fn>
inline void ForWindowInputs(const float* x, int64_t c, const Fn& fn) {
  constexpr int64_t span = S * (O - 1) + D * (K - 1) + 1;
#pragma GCC unroll 32
  for (int64_t t = 0; t < span; ++t) {
    const V xv = Load<V>(x + t * c);
#pragma GCC unroll 8
    for (int64_t o = 0; o < O; ++o) {
      const int64_t u = t - S * o;
      if (u >= 0 && u % D == 0 && u / D < K) fn(xv, o, u / D);
    }
  }
}

// y of one image as `CorrelateImageAny`, for k = K, stride S and dilation D
// known when compiling. A block of O outputs of a row reads, per row of
// taps, the S·(O − 1) + D·(K − 1) + 1 input vectors it spans once each and
// adds each into every output whose window holds it (`ForWindowInputs`),
// with the row's K kernel vectors in registers: about half
// the loads of one load per multiply-add, and O independent accumulators.
template <typename V, int64_t L, int64_t K, int64_t S, int64_t D>
void CorrelateImageK(const float* __restrict xp, const float* __restrict w,
                     float* __restrict y, const Geometry& g, int64_t c0,
                     int64_t c1) {
  constexpr int64_t O = OutputsPerBlock<K>();
  const int64_t c = g.c, row_stride = g.w_pad * c;
  for (int64_t oy = 0; oy < g.h_out; ++oy) {
    const float* row = xp + S * oy * row_stride;
    float* out = y + oy * g.w_out * c;
    for (int64_t cb = c0; cb < c1; cb += L) {
      int64_t ox = 0;
      for (; ox + O <= g.w_out; ox += O) {
        V acc[O] = {};
        for (int64_t i = 0; i < K; ++i) {
          const float* xr = row + D * i * row_stride + S * ox * c + cb;
          V wv[K];
#pragma GCC unroll 8
          for (int64_t j = 0; j < K; ++j) wv[j] = Load<V>(w + (i * K + j) * c + cb);
          ForWindowInputs<V, K, S, D, O>(
              xr, c, [&](V xv, int64_t o, int64_t j) { acc[o] += xv * wv[j]; });
        }
        for (int64_t o = 0; o < O; ++o) Store<V>(out + (ox + o) * c + cb, acc[o]);
      }
      for (; ox < g.w_out; ++ox) {
        V a0 = {};
        for (int64_t i = 0; i < K; ++i) {
          const float* xr = row + D * i * row_stride + S * ox * c + cb;
          for (int64_t j = 0; j < K; ++j) {
            a0 += Load<V>(xr + D * j * c) * Load<V>(w + (i * K + j) * c + cb);
          }
        }
        Store<V>(out + ox * c + cb, a0);
      }
    }
  }
}

// Calls kernel<V, L, K, S, D> for k ∈ {3, 5, 7}, stride and dilation ∈
// {1, 2} (every depthwise conv of the DARTS and MobileNet spaces and their
// stride-1 input gradients), else generic(...).
#define DHA_DISPATCH_KSD(g, kernel, generic, ...)                      \
  do {                                                                \
    const int64_t key = (g).k * 100 + (g).stride * 10 + (g).dilation; \
    switch (key) {                                                    \
      case 311: return kernel<V, L, 3, 1, 1>(__VA_ARGS__);            \
      case 312: return kernel<V, L, 3, 1, 2>(__VA_ARGS__);            \
      case 321: return kernel<V, L, 3, 2, 1>(__VA_ARGS__);            \
      case 322: return kernel<V, L, 3, 2, 2>(__VA_ARGS__);            \
      case 511: return kernel<V, L, 5, 1, 1>(__VA_ARGS__);            \
      case 512: return kernel<V, L, 5, 1, 2>(__VA_ARGS__);            \
      case 521: return kernel<V, L, 5, 2, 1>(__VA_ARGS__);            \
      case 522: return kernel<V, L, 5, 2, 2>(__VA_ARGS__);            \
      case 711: return kernel<V, L, 7, 1, 1>(__VA_ARGS__);            \
      case 712: return kernel<V, L, 7, 1, 2>(__VA_ARGS__);            \
      case 721: return kernel<V, L, 7, 2, 1>(__VA_ARGS__);            \
      case 722: return kernel<V, L, 7, 2, 2>(__VA_ARGS__);            \
      default: return generic<V, L>(__VA_ARGS__);                     \
    }                                                                 \
  } while (0)

template <typename V, int64_t L>
void CorrelateImage(const float* xp, const float* w, float* y,
                    const Geometry& g, int64_t c0, int64_t c1) {
  DHA_DISPATCH_KSD(g, CorrelateImageK, CorrelateImageAny, xp, w, y, g, c0,
                   c1);
}

// ∂xp of one image (added to its zeroed scratch), channels [c0, c1). Not
// inlined: inside the separable backward pass GCC then kept its strides on
// the stack and the loop ran 1.4x slower.
template <typename V, int64_t L>
__attribute__((noinline)) void ScatterImage(
    const float* __restrict gy, const float* __restrict w,
    float* __restrict dxp, const Geometry& g, int64_t c0, int64_t c1) {
  const int64_t c = g.c, step = g.stride * c;
  for (int64_t oy = 0; oy < g.h_out; ++oy) {
    const float* grow = gy + oy * g.w_out * c;
    for (int64_t i = 0; i < g.k; ++i) {
      float* drow = dxp + (g.stride * oy + g.dilation * i) * g.w_pad * c;
      for (int64_t j = 0; j < g.k; ++j) {
        for (int64_t cb = c0; cb < c1; cb += L) {
          const V wv = Load<V>(w + (i * g.k + j) * c + cb);
          float* d = drow + g.dilation * j * c + cb;
          const float* gp = grow + cb;
          for (int64_t ox = 0; ox < g.w_out; ++ox) {
            float* t = d + ox * step;
            Store<V>(t, Load<V>(t) + Load<V>(gp + ox * c) * wv);
          }
        }
      }
    }
  }
}

// ∂w += one image's sum, channels [c0, c1), for any k: one tap at a time.
template <typename V, int64_t L>
void KernelGradImage(const float* __restrict xp, const float* __restrict gy,
                     float* __restrict dw, const Geometry& g, int64_t c0,
                     int64_t c1) {
  const int64_t c = g.c, step = g.stride * c;
  for (int64_t i = 0; i < g.k; ++i) {
    for (int64_t j = 0; j < g.k; ++j) {
      for (int64_t cb = c0; cb < c1; cb += L) {
        V a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t oy = 0; oy < g.h_out; ++oy) {
          const float* xr =
              xp + ((g.stride * oy + g.dilation * i) * g.w_pad +
                    g.dilation * j) * c + cb;
          const float* gr = gy + oy * g.w_out * c + cb;
          int64_t ox = 0;
          for (; ox + 4 <= g.w_out; ox += 4) {
            a0 += Load<V>(xr + ox * step) * Load<V>(gr + ox * c);
            a1 += Load<V>(xr + (ox + 1) * step) * Load<V>(gr + (ox + 1) * c);
            a2 += Load<V>(xr + (ox + 2) * step) * Load<V>(gr + (ox + 2) * c);
            a3 += Load<V>(xr + (ox + 3) * step) * Load<V>(gr + (ox + 3) * c);
          }
          for (; ox < g.w_out; ++ox) {
            a0 += Load<V>(xr + ox * step) * Load<V>(gr + ox * c);
          }
        }
        float* out = dw + (i * g.k + j) * c + cb;
        Store<V>(out, Load<V>(out) + ((a0 + a1) + (a2 + a3)));
      }
    }
  }
}

// The same for k = K, stride S and dilation D known when compiling: a row
// of K taps at once. A block of O outputs (4; 2 when strided, whose windows
// share fewer inputs) loads its O cotangent vectors and the input vectors
// its windows span once each (`ForWindowInputs`); even and odd outputs add
// into two sets of K accumulators (2K independent chains).
template <typename V, int64_t L, int64_t K, int64_t S, int64_t D>
void KernelGradImageK(const float* __restrict xp, const float* __restrict gy,
                      float* __restrict dw, const Geometry& g, int64_t c0,
                      int64_t c1) {
  constexpr int64_t O = S == 1 ? 4 : 2;
  const int64_t c = g.c;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t cb = c0; cb < c1; cb += L) {
      V a[2][K] = {};
      for (int64_t oy = 0; oy < g.h_out; ++oy) {
        const float* xr = xp + (S * oy + D * i) * g.w_pad * c + cb;
        const float* gr = gy + oy * g.w_out * c + cb;
        int64_t ox = 0;
        for (; ox + O <= g.w_out; ox += O) {
          V gv[O];
#pragma GCC unroll 8
          for (int64_t o = 0; o < O; ++o) gv[o] = Load<V>(gr + (ox + o) * c);
          const float* x0 = xr + S * ox * c;
          ForWindowInputs<V, K, S, D, O>(
              x0, c, [&](V xv, int64_t o, int64_t j) {
                a[o % 2][j] += xv * gv[o];
              });
        }
        for (; ox < g.w_out; ++ox) {
          const V g0 = Load<V>(gr + ox * c);
          for (int64_t j = 0; j < K; ++j) {
            a[0][j] += Load<V>(xr + (S * ox + D * j) * c) * g0;
          }
        }
      }
      for (int64_t j = 0; j < K; ++j) {
        float* out = dw + (i * K + j) * c + cb;
        Store<V>(out, Load<V>(out) + (a[0][j] + a[1][j]));
      }
    }
  }
}

template <typename V, int64_t L>
void KernelGrad(const float* xp, const float* gy, float* dw,
                const Geometry& g, int64_t c0, int64_t c1) {
  DHA_DISPATCH_KSD(g, KernelGradImageK, KernelGradImage, xp, gy, dw, g, c0,
                   c1);
}

// Runs fn(0), ..., fn(parts − 1) on the intra-op pool and the calling
// thread. The caller takes parts too, so it finishes even when no pool
// thread is free; closures that start after the last part only find the
// counter exhausted (the state they share is reference-counted).
void ParallelFor(ffi::ThreadPool& pool, int64_t parts,
                 const std::function<void(int64_t)>& fn) {
  if (parts <= 1) {
    if (parts == 1) fn(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  const std::function<void(int64_t)>* body = &fn;
  auto work = [state, parts, body]() {
    for (int64_t part; (part = state->next.fetch_add(1)) < parts;) {
      (*body)(part);
      std::lock_guard<std::mutex> lock(state->mutex);
      if (++state->done == parts) state->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == parts; });
}

// The range [begin, end) of part `part` of `parts` of n items (images,
// rows).
std::pair<int64_t, int64_t> PartRange(int64_t n, int64_t part, int64_t parts) {
  return {n * part / parts, n * (part + 1) / parts};
}

int64_t Parts(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

// Calls kernel<Vec8, 8> on the channels in blocks of 8 and kernel<float, 1>
// on the rest.
#define DHA_FOR_CHANNEL_BLOCKS(kernel, g, ...)                        \
  do {                                                                \
    const int64_t vec_end = (g).c - (g).c % kLanes;                   \
    if (vec_end > 0) kernel<Vec8, kLanes>(__VA_ARGS__, 0, vec_end);   \
    if (vec_end < (g).c) kernel<float, 1>(__VA_ARGS__, vec_end, (g).c); \
  } while (0)

// The geometry of ∂x as a stride-1 correlation of the cotangent: the
// cotangent [h_out, w_out] padded by d(k − 1) − p, correlated with the
// flipped kernel, gives ∂x [h, w].
Geometry TransposedGeometry(const Geometry& g) {
  const int64_t reach = g.dilation * (g.k - 1);
  Geometry t{g.n, g.h_out, g.w_out, g.c, g.k, g.h, g.w, 1, g.dilation,
             reach - g.padding, 0, 0};
  t.h_pad = std::max(t.h + 2 * t.padding, t.h_out + reach);
  t.w_pad = std::max(t.w + 2 * t.padding, t.w_out + reach);
  return t;
}

// ∂x of one image for the cotangent gd [h_out, w_out, C]. Stride 1: the
// correlation of the padded cotangent with the flipped kernel, each output
// accumulated in registers (`CorrelateImage`); strided: each cotangent
// scattered into the padded ∂x (`ScatterImage`), then cropped. Scratch
// buffers are the caller's, one per thread.
class DepthwiseInputGrad {
 public:
  DepthwiseInputGrad(const Geometry& g, const float* w)
      : g_(g), t_(TransposedGeometry(g)), w_(w),
        gather_(g.stride == 1 && t_.padding >= 0) {
    if (gather_) {
      flipped_.resize(g.k * g.k * g.c);
      for (int64_t i = 0; i < g.k; ++i) {
        for (int64_t j = 0; j < g.k; ++j) {
          std::memcpy(flipped_.data() + (i * g.k + j) * g.c,
                      w + ((g.k - 1 - i) * g.k + (g.k - 1 - j)) * g.c,
                      sizeof(float) * g.c);
        }
      }
    }
  }

  // Scratch floats per thread.
  int64_t scratch_size() const {
    return gather_ ? t_.image_pad() : g_.image_pad();
  }

  void operator()(const float* gd, float* dx, float* scratch) const {
    if (gather_) {
      PadImage(gd, scratch, t_);
      DHA_FOR_CHANNEL_BLOCKS(CorrelateImage, t_, scratch, flipped_.data(), dx,
                             t_);
    } else {
      std::memset(scratch, 0, sizeof(float) * g_.image_pad());
      DHA_FOR_CHANNEL_BLOCKS(ScatterImage, g_, gd, w_, scratch, g_);
      CropImage(scratch, dx, g_);
    }
  }

 private:
  Geometry g_, t_;
  const float* w_;
  bool gather_;
  std::vector<float> flipped_;
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t dilation, int64_t padding) {
  const Geometry g = MakeGeometry(x.dimensions(), w.dimensions()[0],
                                  y->dimensions(), stride, dilation, padding);
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  const int64_t parts = Parts(pool, g.n);
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<float> xp(g.image_pad());
    auto [begin, end] = PartRange(g.n, part, parts);
    for (int64_t n = begin; n < end; ++n) {
      PadImage(xs + n * g.image(), xp.data(), g);
      DHA_FOR_CHANNEL_BLOCKS(CorrelateImage, g, xp.data(), ws,
                             ys + n * g.image_out(), g);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> gy,
                    ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dw, int64_t stride,
                    int64_t dilation, int64_t padding) {
  const Geometry g = MakeGeometry(x.dimensions(), w.dimensions()[0],
                                  gy.dimensions(), stride, dilation, padding);
  const int64_t taps = g.k * g.k * g.c;
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  const float* gs = gy.typed_data();
  float* dxs = dx->typed_data();
  const int64_t parts = Parts(pool, g.n);
  const DepthwiseInputGrad input_grad(g, ws);
  // One partial ∂w per part, summed in a fixed order: the result does not
  // depend on which thread ran which part.
  std::vector<float> partial(parts * taps, 0.0f);
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<float> xp(g.image_pad()), scratch(input_grad.scratch_size());
    float* dw_part = partial.data() + part * taps;
    auto [begin, end] = PartRange(g.n, part, parts);
    for (int64_t n = begin; n < end; ++n) {
      const float* gn = gs + n * g.image_out();
      PadImage(xs + n * g.image(), xp.data(), g);
      input_grad(gn, dxs + n * g.image(), scratch.data());
      DHA_FOR_CHANNEL_BLOCKS(KernelGrad, g, xp.data(), gn, dw_part, g);
    }
  });
  float* dws = dw->typed_data();
  std::memset(dws, 0, sizeof(float) * taps);
  for (int64_t part = 0; part < parts; ++part) {
    for (int64_t t = 0; t < taps; ++t) dws[t] += partial[part * taps + t];
  }
  return ffi::Error::Success();
}

// Accumulators per tile of the products below: a chain of multiply-adds
// into one accumulator waits for each result (4-5 cycles), so eight
// independent chains keep a core's two FMA units busy.
constexpr int64_t kTile = 8;

// out[r, cb:cb + NV·L] = a[r]·b[:, cb:cb + NV·L] for the R rows from r0 of
// a [M, K] and b [K, C]: R·NV accumulators in registers.
template <typename V, int64_t L, int64_t R, int64_t NV>
inline void ProductTile(const float* __restrict a, const float* __restrict b,
                        float* __restrict out, int64_t k, int64_t c,
                        int64_t r0, int64_t cb) {
  V o[R][NV] = {};
  const float* ar = a + r0 * k;
  for (int64_t i = 0; i < k; ++i) {
    V bv[NV];
    for (int64_t v = 0; v < NV; ++v) bv[v] = Load<V>(b + i * c + cb + v * L);
    for (int64_t r = 0; r < R; ++r) {
      const float s = ar[r * k + i];
      for (int64_t v = 0; v < NV; ++v) o[r][v] += s * bv[v];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) {
      Store<V>(out + (r0 + r) * c + cb + v * L, o[r][v]);
    }
  }
}

template <typename V, int64_t L, int64_t NV>
void ProductColumns(const float* a, const float* b, float* out, int64_t k,
                    int64_t c, int64_t r0, int64_t r1, int64_t cb) {
  constexpr int64_t R = kTile / NV;
  int64_t r = r0;
  for (; r + R <= r1; r += R) ProductTile<V, L, R, NV>(a, b, out, k, c, r, cb);
  for (; r < r1; ++r) ProductTile<V, L, 1, NV>(a, b, out, k, c, r, cb);
}

// Calls fn(nv, cb) for the C columns in blocks of nv vectors of L lanes from
// column cb: nv = 2 (an std::integral_constant) while two fit, then 1.
template <int64_t L, typename Fn>
void ForColumnVectors(int64_t c, const Fn& fn) {
  int64_t cb = 0;
  for (; cb + 2 * L <= c; cb += 2 * L) fn(std::integral_constant<int64_t, 2>(), cb);
  for (; cb < c; cb += L) fn(std::integral_constant<int64_t, 1>(), cb);
}

// out[m] = a[m]·b for rows [r0, r1) of a [M, K] and b [K, C], C in vectors
// of L lanes (C a multiple of L), two vectors of columns at a time.
template <typename V, int64_t L>
void ProductRows(const float* a, const float* b, float* out, int64_t k,
                 int64_t c, int64_t r0, int64_t r1) {
  ForColumnVectors<L>(c, [&](auto nv, int64_t cb) {
    ProductColumns<V, L, decltype(nv)::value>(a, b, out, k, c, r0, r1, cb);
  });
}

// sums[i0 + i, cb:cb + NV·L] += Σ_m a[m, i0 + i]·b[m, cb:cb + NV·L] for
// i < I over rows [r0, r1): I·NV accumulators, float32 over the rows, then
// added to double.
template <typename V, int64_t L, int64_t I, int64_t NV>
inline void OuterTile(const float* __restrict a, const float* __restrict b,
                      double* __restrict sums, int64_t k, int64_t c,
                      int64_t r0, int64_t r1, int64_t i0, int64_t cb) {
  V s[I][NV] = {};
  for (int64_t r = r0; r < r1; ++r) {
    V bv[NV];
    for (int64_t v = 0; v < NV; ++v) bv[v] = Load<V>(b + r * c + cb + v * L);
    for (int64_t i = 0; i < I; ++i) {
      const float x = a[r * k + i0 + i];
      for (int64_t v = 0; v < NV; ++v) s[i][v] += x * bv[v];
    }
  }
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t v = 0; v < NV; ++v) {
      AddTo<V, L>(sums + (i0 + i) * c + cb + v * L, s[i][v]);
    }
  }
}

template <typename V, int64_t L, int64_t NV>
void OuterColumns(const float* a, const float* b, double* sums, int64_t k,
                  int64_t c, int64_t r0, int64_t r1, int64_t cb) {
  constexpr int64_t I = kTile / NV;
  int64_t i0 = 0;
  for (; i0 + I <= k; i0 += I) {
    OuterTile<V, L, I, NV>(a, b, sums, k, c, r0, r1, i0, cb);
  }
  for (; i0 < k; ++i0) OuterTile<V, L, 1, NV>(a, b, sums, k, c, r0, r1, i0, cb);
}

// sums[i, :] += Σ_m a[m, i]·b[m, :] over rows [r0, r1) of a [M, K] and
// b [M, C] (C a multiple of L), two vectors of columns at a time.
template <typename V, int64_t L>
void OuterRows(const float* a, const float* b, double* sums, int64_t k,
               int64_t c, int64_t r0, int64_t r1) {
  ForColumnVectors<L>(c, [&](auto nv, int64_t cb) {
    OuterColumns<V, L, decltype(nv)::value>(a, b, sums, k, c, r0, r1, cb);
  });
}

// ProductRows over rows [r0, r1), in vectors when C allows.
void Product(const float* a, const float* b, float* out, int64_t k,
             int64_t c, int64_t r0, int64_t r1) {
  if (c % kLanes == 0) {
    ProductRows<Vec8, kLanes>(a, b, out, k, c, r0, r1);
  } else {
    ProductRows<float, 1>(a, b, out, k, c, r0, r1);
  }
}

// OuterRows over rows [r0, r1), in vectors when C allows.
void Outer(const float* a, const float* b, double* sums, int64_t k,
           int64_t c, int64_t r0, int64_t r1) {
  if (c % kLanes == 0) {
    OuterRows<Vec8, kLanes>(a, b, sums, k, c, r0, r1);
  } else {
    OuterRows<float, 1>(a, b, sums, k, c, r0, r1);
  }
}

// wᵀ [C_out, C] of w [C, C_out].
std::vector<float> Transposed(const float* w, int64_t c, int64_t c_out) {
  std::vector<float> t(c * c_out);
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = 0; j < c_out; ++j) t[j * c + i] = w[i * c_out + j];
  }
  return t;
}

// Σ over parts of partial [parts, size] (double) into out (float32), in
// the parts' order.
void SumParts(const std::vector<double>& partial, int64_t parts,
              int64_t size, float* out) {
  for (int64_t t = 0; t < size; ++t) {
    double total = 0.0;
    for (int64_t part = 0; part < parts; ++part) {
      total += partial[part * size + t];
    }
    out[t] = static_cast<float>(total);
  }
}

// ReLU → depthwise → pointwise (DARTS' DilConv without its BatchNorm) of
// one image: d = depthwise(relu(x)) into its scratch, then y = d·pw.
ffi::Error SeparableForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> dw, ffi::Buffer<ffi::F32> pw,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                            int64_t dilation, int64_t padding) {
  const Geometry g = MakeGeometry(x.dimensions(), dw.dimensions()[0],
                                  y->dimensions(), stride, dilation, padding);
  const int64_t c_out = pw.dimensions()[1], pixels = g.h_out * g.w_out;
  const float* xs = x.typed_data();
  const float* dws = dw.typed_data();
  const float* pws = pw.typed_data();
  float* ys = y->typed_data();
  const int64_t parts = Parts(pool, g.n);
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<float> xp(g.image_pad()), d(g.image_out());
    auto [begin, end] = PartRange(g.n, part, parts);
    for (int64_t n = begin; n < end; ++n) {
      PadImage(xs + n * g.image(), xp.data(), g, /*relu=*/true);
      DHA_FOR_CHANNEL_BLOCKS(CorrelateImage, g, xp.data(), dws, d.data(), g);
      Product(d.data(), pws, ys + n * pixels * c_out, g.c, c_out, 0, pixels);
    }
  });
  return ffi::Error::Success();
}

// Its backward pass, one image at a time, in cache: d recomputed from x
// (cheaper than keeping it: the step is bound by memory, not arithmetic),
// ∂pw += dᵀ·g, ∂d = g·pwᵀ, then the depthwise conv's ∂x and ∂dw for ∂d, and
// ∂x through the ReLU.
ffi::Error SeparableBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> dw,
                             ffi::Buffer<ffi::F32> pw, ffi::Buffer<ffi::F32> gy,
                             ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> ddw,
                             ffi::ResultBuffer<ffi::F32> dpw, int64_t stride,
                             int64_t dilation, int64_t padding) {
  const Geometry g = MakeGeometry(x.dimensions(), dw.dimensions()[0],
                                  gy.dimensions(), stride, dilation, padding);
  const int64_t c_out = pw.dimensions()[1], pixels = g.h_out * g.w_out;
  const int64_t taps = g.k * g.k * g.c, weights = g.c * c_out;
  const float* xs = x.typed_data();
  const float* dws = dw.typed_data();
  const float* gs = gy.typed_data();
  float* dxs = dx->typed_data();
  const std::vector<float> pw_t = Transposed(pw.typed_data(), g.c, c_out);
  const int64_t parts = Parts(pool, g.n);
  const DepthwiseInputGrad input_grad(g, dws);
  std::vector<float> dw_partial(parts * taps, 0.0f);
  std::vector<double> pw_partial(parts * weights, 0.0);
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<float> xp(g.image_pad()), scratch(input_grad.scratch_size());
    std::vector<float> d(g.image_out()), gd(g.image_out());
    float* dw_part = dw_partial.data() + part * taps;
    double* pw_part = pw_partial.data() + part * weights;
    auto [begin, end] = PartRange(g.n, part, parts);
    for (int64_t n = begin; n < end; ++n) {
      const float* xn = xs + n * g.image();
      const float* gn = gs + n * pixels * c_out;
      float* dxn = dxs + n * g.image();
      PadImage(xn, xp.data(), g, /*relu=*/true);
      DHA_FOR_CHANNEL_BLOCKS(CorrelateImage, g, xp.data(), dws, d.data(), g);
      Outer(d.data(), gn, pw_part, g.c, c_out, 0, pixels);
      Product(gn, pw_t.data(), gd.data(), c_out, g.c, 0, pixels);
      input_grad(gd.data(), dxn, scratch.data());
      DHA_FOR_CHANNEL_BLOCKS(KernelGrad, g, xp.data(), gd.data(), dw_part, g);
      MaskThroughRelu(xn, dxn, g.image());
    }
  });
  float* ddws = ddw->typed_data();
  float* dpws = dpw->typed_data();
  std::memset(ddws, 0, sizeof(float) * taps);
  for (int64_t part = 0; part < parts; ++part) {
    for (int64_t t = 0; t < taps; ++t) ddws[t] += dw_partial[part * taps + t];
  }
  SumParts(pw_partial, parts, weights, dpws);
  return ffi::Error::Success();
}

// Input floats per block of rows of the ReLU → 1×1 conv kernels (16 KiB):
// a block's ReLU stays in the core's L1 cache (32 KiB here) beside the
// kernel and the block's output or cotangent.
constexpr int64_t kPointwiseBlockFloats = 4096;

// Rows per block for C input channels: a whole number of product tiles.
int64_t PointwiseRows(int64_t c) {
  return std::max<int64_t>(kTile, kPointwiseBlockFloats / c / kTile * kTile);
}

// The parts of the ReLU → 1×1 conv kernels' rows of C channels.
int64_t PointwiseParts(ffi::ThreadPool& pool, int64_t rows, int64_t c) {
  const int64_t block = PointwiseRows(c);
  return Parts(pool, (rows + block - 1) / block);
}

// Calls fn(part, r0, n, a) on the pool for every block of n rows from r0 of
// x [rows, C] in the parts' ranges, a the block's ReLU (a part's buffer).
template <typename Fn>
void ForEachReluBlock(ffi::ThreadPool& pool, int64_t parts, const float* xs,
                      int64_t rows, int64_t c, const Fn& fn) {
  const int64_t block = PointwiseRows(c);
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<float> a(block * c);
    auto [begin, end] = PartRange(rows, part, parts);
    for (int64_t r0 = begin; r0 < end; r0 += block) {
      const int64_t n = std::min(end - r0, block);
      Relu(xs + r0 * c, a.data(), n * c);
      fn(part, r0, n, a.data());
    }
  });
}

// ReLU → 1×1 conv (DARTS' ReLU-Conv-BN preprocessing without its
// BatchNorm): y[m] = max(x[m], 0)·w for the rows m of x [M, C] and
// w [C, C_out], a block of rows at a time.
ffi::Error ReluPointwiseForward(ffi::ThreadPool pool,
                                ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> y) {
  const int64_t c = w.dimensions()[0], c_out = w.dimensions()[1];
  const int64_t rows = c == 0 ? 0 : x.element_count() / c;
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  ForEachReluBlock(pool, PointwiseParts(pool, rows, c), x.typed_data(), rows,
                   c, [&](int64_t, int64_t r0, int64_t n, const float* a) {
                     Product(a, ws, ys + r0 * c_out, c, c_out, 0, n);
                   });
  return ffi::Error::Success();
}

// Its backward pass, a block of rows at a time: ∂w = Σ max(x, 0)ᵀ·g (the
// ReLU recomputed), ∂x = g·wᵀ, zero where x ≤ 0.
ffi::Error ReluPointwiseBackward(ffi::ThreadPool pool,
                                 ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> w,
                                 ffi::Buffer<ffi::F32> gy,
                                 ffi::ResultBuffer<ffi::F32> dx,
                                 ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t c = w.dimensions()[0], c_out = w.dimensions()[1];
  const int64_t rows = c == 0 ? 0 : x.element_count() / c;
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  float* dxs = dx->typed_data();
  const std::vector<float> w_t = Transposed(w.typed_data(), c, c_out);
  const int64_t parts = PointwiseParts(pool, rows, c);
  std::vector<double> partial(parts * c * c_out, 0.0);
  ForEachReluBlock(
      pool, parts, xs, rows, c,
      [&](int64_t part, int64_t r0, int64_t n, const float* a) {
        const float* gn = gs + r0 * c_out;
        Outer(a, gn, partial.data() + part * c * c_out, c, c_out, 0, n);
        Product(gn, w_t.data(), dxs + r0 * c, c_out, c, 0, n);
        MaskThroughRelu(xs + r0 * c, dxs + r0 * c, n * c);
      });
  SumParts(partial, parts, c * c_out, dw->typed_data());
  return ffi::Error::Success();
}

// Rows per float32 block of `ChannelSums`: within a block the float32 sums
// of a few hundred values lose little; blocks are summed in double.
constexpr int64_t kRowsPerBlock = 256;

// Adds Σ b and Σ a·b over rows [r0, r1) of the channels [c0, c1) to sums
// (double [2, C]).
template <typename V, int64_t L>
void SumRows(const float* __restrict a, const float* __restrict b,
             int64_t c, int64_t r0, int64_t r1, double* sums, int64_t c0,
             int64_t c1) {
  for (int64_t cb = c0; cb < c1; cb += L) {
    V s0 = {}, s1 = {}, p0 = {}, p1 = {};
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
      const V b0 = Load<V>(b + r * c + cb), b1 = Load<V>(b + (r + 1) * c + cb);
      s0 += b0;
      s1 += b1;
      p0 += Load<V>(a + r * c + cb) * b0;
      p1 += Load<V>(a + (r + 1) * c + cb) * b1;
    }
    for (; r < r1; ++r) {
      const V b0 = Load<V>(b + r * c + cb);
      s0 += b0;
      p0 += Load<V>(a + r * c + cb) * b0;
    }
    AddTo<V, L>(sums + cb, s0 + s1);
    AddTo<V, L>(sums + c + cb, p0 + p1);
  }
}

ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                       ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = b.dimensions();
  const int64_t c = dims[dims.size() - 1];
  const int64_t rows = c == 0 ? 0 : b.element_count() / c;
  const float* as = a.typed_data();
  const float* bs = b.typed_data();
  const int64_t parts = Parts(pool, (rows + kRowsPerBlock - 1) / kRowsPerBlock);
  std::vector<double> partial(parts * 2 * c, 0.0);
  ParallelFor(pool, parts, [&](int64_t part) {
    double* sums = partial.data() + part * 2 * c;
    auto [begin, end] = PartRange(rows, part, parts);
    for (int64_t r0 = begin; r0 < end; r0 += kRowsPerBlock) {
      const int64_t r1 = std::min(end, r0 + kRowsPerBlock);
      const int64_t vec_end = c - c % kLanes;
      if (vec_end > 0) SumRows<Vec8, kLanes>(as, bs, c, r0, r1, sums, 0, vec_end);
      if (vec_end < c) SumRows<float, 1>(as, bs, c, r0, r1, sums, vec_end, c);
    }
  });
  float* o = out->typed_data();
  for (int64_t t = 0; t < 2 * c; ++t) {
    double total = 0.0;
    for (int64_t part = 0; part < parts; ++part) total += partial[part * 2 * c + t];
    o[t] = static_cast<float>(total);
  }
  return ffi::Error::Success();
}

}  // namespace

// The FFI bindings: XLA's intra-op pool, the float32 operands, the float32
// results, then (convs) stride, dilation and padding.
#define DHA_F32 ffi::Buffer<ffi::F32>
#define DHA_CONV_ATTRIBUTES \
  .Attr<int64_t>("stride").Attr<int64_t>("dilation").Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaDepthwiseForward, Forward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Ret<DHA_F32>() DHA_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaDepthwiseBackward, Backward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Arg<DHA_F32>().Ret<DHA_F32>().Ret<DHA_F32>() DHA_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaSeparableForward, SeparableForward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Arg<DHA_F32>().Ret<DHA_F32>() DHA_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaSeparableBackward, SeparableBackward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Arg<DHA_F32>().Arg<DHA_F32>().Ret<DHA_F32>().Ret<DHA_F32>()
        .Ret<DHA_F32>() DHA_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaReluPointwiseForward, ReluPointwiseForward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Ret<DHA_F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaReluPointwiseBackward, ReluPointwiseBackward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Arg<DHA_F32>().Ret<DHA_F32>().Ret<DHA_F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DhaChannelSums, ChannelSums,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Ret<DHA_F32>());
