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

// xp = x padded; with `relu`, max(x, 0) padded.
void PadImage(const float* x, float* xp, const Geometry& g,
              bool relu = false) {
  std::memset(xp, 0, sizeof(float) * g.image_pad());
  for (int64_t y = 0; y < g.h; ++y) {
    float* row = xp + ((y + g.padding) * g.w_pad + g.padding) * g.c;
    const float* in = x + y * g.w * g.c;
    if (relu) {
      for (int64_t t = 0; t < g.w * g.c; ++t) row[t] = in[t] > 0.0f ? in[t] : 0.0f;
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

// y of one image for the channels [c0, c1) in steps of the lanes of V.
template <typename V, int64_t L>
void CorrelateImage(const float* __restrict xp, const float* __restrict w,
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

// ∂xp of one image (added to its zeroed scratch), channels [c0, c1).
template <typename V, int64_t L>
void ScatterImage(const float* __restrict gy, const float* __restrict w,
                  float* __restrict dxp, const Geometry& g, int64_t c0,
                  int64_t c1) {
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

// The same for k = K known when compiling: a row of K taps at once, each
// cotangent vector loaded once for its K products, two outputs at a time
// (2K accumulators in registers).
template <typename V, int64_t L, int64_t K>
void KernelGradImageK(const float* __restrict xp, const float* __restrict gy,
                      float* __restrict dw, const Geometry& g, int64_t c0,
                      int64_t c1) {
  const int64_t c = g.c, step = g.stride * c, tap = g.dilation * c;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t cb = c0; cb < c1; cb += L) {
      V a[K] = {}, b[K] = {};
      for (int64_t oy = 0; oy < g.h_out; ++oy) {
        const float* xr =
            xp + (g.stride * oy + g.dilation * i) * g.w_pad * c + cb;
        const float* gr = gy + oy * g.w_out * c + cb;
        int64_t ox = 0;
        for (; ox + 2 <= g.w_out; ox += 2) {
          const V g0 = Load<V>(gr + ox * c), g1 = Load<V>(gr + (ox + 1) * c);
          const float* x0 = xr + ox * step;
          for (int64_t j = 0; j < K; ++j) {
            a[j] += Load<V>(x0 + j * tap) * g0;
            b[j] += Load<V>(x0 + step + j * tap) * g1;
          }
        }
        for (; ox < g.w_out; ++ox) {
          const V g0 = Load<V>(gr + ox * c);
          for (int64_t j = 0; j < K; ++j) a[j] += Load<V>(xr + ox * step + j * tap) * g0;
        }
      }
      for (int64_t j = 0; j < K; ++j) {
        float* out = dw + (i * K + j) * c + cb;
        Store<V>(out, Load<V>(out) + (a[j] + b[j]));
      }
    }
  }
}

template <typename V, int64_t L>
void KernelGrad(const float* xp, const float* gy, float* dw,
                const Geometry& g, int64_t c0, int64_t c1) {
  switch (g.k) {
    case 3: return KernelGradImageK<V, L, 3>(xp, gy, dw, g, c0, c1);
    case 5: return KernelGradImageK<V, L, 5>(xp, gy, dw, g, c0, c1);
    case 7: return KernelGradImageK<V, L, 7>(xp, gy, dw, g, c0, c1);
    default: return KernelGradImage<V, L>(xp, gy, dw, g, c0, c1);
  }
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

// out[m] = a[m]·b for rows [r0, r1) of a [M, K] and b [K, C], C in vectors
// of L lanes (C a multiple of L).
template <typename V, int64_t L>
void ProductRows(const float* __restrict a, const float* __restrict b,
                 float* __restrict out, int64_t k, int64_t c, int64_t r0,
                 int64_t r1) {
  for (int64_t cb = 0; cb < c; cb += L) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      V o0 = {}, o1 = {}, o2 = {}, o3 = {};
      const float* a0 = a + r * k;
      for (int64_t i = 0; i < k; ++i) {
        const V bv = Load<V>(b + i * c + cb);
        o0 += a0[i] * bv;
        o1 += a0[k + i] * bv;
        o2 += a0[2 * k + i] * bv;
        o3 += a0[3 * k + i] * bv;
      }
      Store<V>(out + r * c + cb, o0);
      Store<V>(out + (r + 1) * c + cb, o1);
      Store<V>(out + (r + 2) * c + cb, o2);
      Store<V>(out + (r + 3) * c + cb, o3);
    }
    for (; r < r1; ++r) {
      V o0 = {};
      for (int64_t i = 0; i < k; ++i) o0 += a[r * k + i] * Load<V>(b + i * c + cb);
      Store<V>(out + r * c + cb, o0);
    }
  }
}

// sums[i, :] += Σ_m a[m, i]·b[m, :] over rows [r0, r1) of a [M, K] and
// b [M, C] (C a multiple of L), float32 over the rows, added to double.
template <typename V, int64_t L>
void OuterRows(const float* __restrict a, const float* __restrict b,
               double* __restrict sums, int64_t k, int64_t c, int64_t r0,
               int64_t r1) {
  // Four rows of the sum at a time, in four named accumulators (an array
  // indexed by a runtime count would live in memory), then one at a time.
  for (int64_t cb = 0; cb < c; cb += L) {
    int64_t i0 = 0;
    for (; i0 + 4 <= k; i0 += 4) {
      V s0 = {}, s1 = {}, s2 = {}, s3 = {};
      for (int64_t r = r0; r < r1; ++r) {
        const V bv = Load<V>(b + r * c + cb);
        const float* ar = a + r * k + i0;
        s0 += ar[0] * bv;
        s1 += ar[1] * bv;
        s2 += ar[2] * bv;
        s3 += ar[3] * bv;
      }
      AddTo<V, L>(sums + i0 * c + cb, s0);
      AddTo<V, L>(sums + (i0 + 1) * c + cb, s1);
      AddTo<V, L>(sums + (i0 + 2) * c + cb, s2);
      AddTo<V, L>(sums + (i0 + 3) * c + cb, s3);
    }
    for (; i0 < k; ++i0) {
      V s0 = {};
      for (int64_t r = r0; r < r1; ++r) s0 += a[r * k + i0] * Load<V>(b + r * c + cb);
      AddTo<V, L>(sums + i0 * c + cb, s0);
    }
  }
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
  std::vector<float> pw_t(weights);   // pwᵀ [C_out, C]
  for (int64_t i = 0; i < g.c; ++i) {
    for (int64_t j = 0; j < c_out; ++j) {
      pw_t[j * g.c + i] = pw.typed_data()[i * c_out + j];
    }
  }
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
      if (c_out % kLanes == 0) {
        OuterRows<Vec8, kLanes>(d.data(), gn, pw_part, g.c, c_out, 0, pixels);
      } else {
        OuterRows<float, 1>(d.data(), gn, pw_part, g.c, c_out, 0, pixels);
      }
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
  for (int64_t t = 0; t < weights; ++t) {
    double total = 0.0;
    for (int64_t part = 0; part < parts; ++part) {
      total += pw_partial[part * weights + t];
    }
    dpws[t] = static_cast<float>(total);
  }
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
    DhaChannelSums, ChannelSums,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<DHA_F32>().Arg<DHA_F32>()
        .Ret<DHA_F32>());
