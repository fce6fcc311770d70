// CPU kernels of fastres._C, compiled once per CPU capability.
//
// NOT a normal header: it is included (once) by kernels_default.cpp,
// kernels_avx2.cpp and kernels_avx512.cpp after they have
//   * included every non-vector header (so that c10/ATen inline functions are
//     compiled for the baseline ISA),
//   * set `#pragma GCC target(...)` for the capability,
//   * defined CPU_CAPABILITY (DEFAULT / AVX2 / AVX512) and CPU_CAPABILITY_<X>,
//   * included <ATen/cpu/vec/vec.h>.
// All code lives in fastres::cpu::<CAPABILITY>::(anonymous), so the three copies
// never clash; the only external symbol is fastres::cpu::<CAPABILITY>::kernels().
//
// Design (see docs/DESIGN.md for the op semantics):
//  * Layouts: NCHW is [N][C][HW] (a channel is N runs of HW contiguous values);
//    "rows" is [N*HW][C] (channels_last, or HW == 1).
//  * Reductions are split into fixed "units" that depend only on the shape
//    (never on the thread count). Each unit is processed by one thread and
//    writes its own partial; partials are combined per channel in unit order,
//    in double. Results are therefore bitwise reproducible for a given shape
//    and capability, whatever the number of threads.
//  * Variance: each unit (<= kUnit elements, cache resident) does a corrected
//    two-pass (mean, then sum of (x-m) and (x-m)^2), the unit partials
//    (count, mean, M2) are merged with Chan's formula in double. Never
//    E[x^2]-E[x]^2 on raw values, so huge-magnitude near-constant channels are
//    fine.
//  * Element-wise passes compute z = (x - center[c]) * scale[c] + shift[c]
//    (+ residual), ReLU, in one sweep, accumulation dtype = float (double for
//    double inputs); 16-bit types are converted on load/store.

namespace fastres::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per reduction unit. Part of the numerics contract: changing it
// changes the (deterministic) rounding of the statistics.
constexpr int64_t kUnit = 8192;
// Minimum elements per parallel task (below that, run inline: an OpenMP region
// costs more than it saves, especially on a loaded machine).
constexpr int64_t kGrain = 32768;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Load / store W acc values from / to a scalar_t pointer.
template <typename T>
struct IO;

// float / double: accumulate in the type itself.
template <typename T>
struct IOPlain {
  using acc_t = T;
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, const V& v) { v.store(p); }
};

// bfloat16 / half: accumulate in float, converted on load and store.
template <typename T>
struct IO16 {
  static constexpr bool kBF16 = std::is_same_v<T, c10::BFloat16>;
  using acc_t = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = V::size();
  static V load(const T* p) {
    V out;
    if constexpr (kBF16) at::vec::load_fp32_from_bf16(p, out);
    else at::vec::load_fp32_from_fp16(p, out);
    return out;
  }
  static void store(T* p, const V& v) {
    if constexpr (kBF16) at::vec::convert_float_bfloat16(v, v).store(p, static_cast<int>(W));
    else at::vec::convert_float_half(v, v).store(p, static_cast<int>(W));
  }
};

template <> struct IO<float> : IOPlain<float> {};
template <> struct IO<double> : IOPlain<double> {};
template <> struct IO<c10::BFloat16> : IO16<c10::BFloat16> {};
template <> struct IO<c10::Half> : IO16<c10::Half> {};

template <typename T>
using acc_of = typename IO<T>::acc_t;

// The vector types of a kernel body on T: IOT (load / store of T), A (acc type),
// V (vector of A) and W (its width).
#define FASTRES_VEC_TYPES(T)   \
  using IOT = IO<T>;           \
  using A = acc_of<T>;         \
  using V = typename IOT::V;   \
  constexpr int64_t W = IOT::W

// Scalar helpers with the same semantics as the vector code.
template <typename A>
inline A relu_s(A z) { return z < A(0) ? A(0) : z; }  // NaN passes, like torch.relu
template <typename A>
inline A mask_s(A gy, A y) { return (y <= A(0)) ? A(0) : gy; }  // threshold_backward

template <typename V>
inline V relu_v(const V& z) { return at::vec::clamp_min(z, V(0)); }  // max(0, z), NaN passes
template <typename V>
inline V mask_v(const V& gy, const V& y) { return V::blendv(gy, V(0), y <= V(0)); }

// Fixed-order horizontal sum.
template <typename V>
inline typename V::value_type hsum(const V& v) {
  using A = typename V::value_type;
  alignas(64) A buf[V::size()];
  v.store(buf);
  A s = A(0);
  for (int64_t i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

// Visit the contiguous runs of channel c's logical range [l0, l1) of an NCHW
// tensor (logical index l = n*HW + hw). f(element_offset, length).
template <typename F>
inline void nchw_runs(const Geom& g, int64_t c, int64_t l0, int64_t l1, const F& f) {
  int64_t n = l0 / g.HW;
  int64_t hw = l0 - n * g.HW;
  int64_t l = l0;
  while (l < l1) {
    const int64_t len = std::min(g.HW - hw, l1 - l);
    f((n * g.C + c) * g.HW + hw, len);
    l += len;
    ++n;
    hw = 0;
  }
}

// Fixed reduction partition of a channel's M elements (NCHW) or of the M rows
// (rows layout). Depends only on the shape.
struct Partition {
  int64_t J = 1;     // NCHW: units per channel
  int64_t R = 1;     // rows: rows per unit
  int64_t U = 0;     // total units
  int64_t grain = 1;          // parallel_for grain over units (threads only, never numerics)
  int64_t combine_grain = 1;  // parallel_for grain over channels for the combine
};

inline Partition make_partition(const Geom& g) {
  Partition p;
  const int64_t M = g.M();
  if (g.rows) {
    // >= 32 rows per unit: the per-unit, per-channel work must stay small next to the data
    p.R = std::max<int64_t>(32, kUnit / std::max<int64_t>(g.C, 1));
    p.U = ceil_div(M, p.R);
  } else {
    p.J = std::max<int64_t>(1, ceil_div(M, kUnit));
    p.U = g.C * p.J;
  }
  const int64_t per_unit = std::max<int64_t>(1, (M * g.C) / std::max<int64_t>(p.U, 1));
  p.grain = std::max<int64_t>(1, kGrain / per_unit);
  const int64_t partials_per_channel = std::max<int64_t>(1, g.rows ? p.U : p.J);
  // The combine is a few flops per partial: keep it inline unless it is big.
  p.combine_grain = std::max<int64_t>(1, (int64_t(1) << 20) / partials_per_channel);
  return p;
}

// Balanced split of [0, M) into J chunks: start of chunk j (no overflow).
inline int64_t chunk_start(int64_t M, int64_t J, int64_t j) {
  const int64_t q = M / J, r = M % J;
  return j * q + std::min(j, r);
}

// max(v, 0) that keeps NaN (std::max(0.0, NaN) is 0).
inline double clamp_nonneg(double v) { return v < 0.0 ? 0.0 : v; }

// Chan merge of (n, mean, m2) partials, in double.
struct Welford {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {
    if (nb <= 0) return;
    if (n == 0) {  // (avoids 0 * delta^2 = NaN for an infinite first mean)
      n = nb;
      mean = mb;
      m2 = m2b;
      return;
    }
    const double nt = n + nb;
    const double delta = mb - mean;
    mean += delta * (nb / nt);
    m2 += m2b + delta * delta * (n * nb / nt);
    n = nt;
  }
};

// ---------------------------------------------------------------------------
// Statistics (bn_act_train). Writes per-unit partials (count implied by the
// partition, mean, M2) into pm / pq.

// Corrected two-pass over a set of runs: returns (mean, M2) in double.
template <typename T>
inline void unit_stats_nchw(const Geom& g, const T* x, int64_t c, int64_t l0, int64_t l1,
                            double& mean_out, double& m2_out, double& sum_out) {
  FASTRES_VEC_TYPES(T);
  const int64_t cnt = l1 - l0;
  // pass 1: sum
  V a0(0), a1(0), a2(0), a3(0);
  A s = A(0);
  nchw_runs(g, c, l0, l1, [&](int64_t off, int64_t len) {
    const T* p = x + off;
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      a0 = a0 + IOT::load(p + i);
      a1 = a1 + IOT::load(p + i + W);
      a2 = a2 + IOT::load(p + i + 2 * W);
      a3 = a3 + IOT::load(p + i + 3 * W);
    }
    for (; i + W <= len; i += W) a0 = a0 + IOT::load(p + i);
    for (; i < len; ++i) s += static_cast<A>(p[i]);
  });
  const A total = hsum((a0 + a1) + (a2 + a3)) + s;
  sum_out = static_cast<double>(total);
  const A m = total / static_cast<A>(cnt);
  // pass 2 (cache resident): sum of (x-m) and (x-m)^2
  const V mv(m);
  V d0(0), d1(0), q0(0), q1(0);
  A ds = A(0), qs = A(0);
  nchw_runs(g, c, l0, l1, [&](int64_t off, int64_t len) {
    const T* p = x + off;
    int64_t i = 0;
    for (; i + 2 * W <= len; i += 2 * W) {
      const V e0 = IOT::load(p + i) - mv;
      const V e1 = IOT::load(p + i + W) - mv;
      d0 = d0 + e0;
      d1 = d1 + e1;
      q0 = at::vec::fmadd(e0, e0, q0);
      q1 = at::vec::fmadd(e1, e1, q1);
    }
    for (; i + W <= len; i += W) {
      const V e0 = IOT::load(p + i) - mv;
      d0 = d0 + e0;
      q0 = at::vec::fmadd(e0, e0, q0);
    }
    for (; i < len; ++i) {
      const A e = static_cast<A>(p[i]) - m;
      ds += e;
      qs += e * e;
    }
  });
  const double D = static_cast<double>(hsum(d0 + d1) + ds);
  const double Q = static_cast<double>(hsum(q0 + q1) + qs);
  const double n = static_cast<double>(cnt);
  mean_out = static_cast<double>(m) + D / n;
  m2_out = clamp_nonneg(Q - D * D / n);
}

// Rows layout: per-channel accumulators live in scratch arrays (C is a runtime
// size). With few vectors per row, row r's update of a channel would wait on
// row r-1's (a store->load dependency chain): then NA = 4 arrays are used, row r
// going to array r % 4 (independent chains), merged in a fixed order.
template <typename T>
inline int64_t rows_num_acc(int64_t C) {
  return C >= 4 * IO<T>::W ? 1 : 4;
}

// Rows layout: rows [r0, r1), all channels. scratch: 16*C acc values.
template <typename T>
inline void unit_stats_rows(const Geom& g, const T* x, int64_t r0, int64_t r1, acc_of<T>* scratch,
                            double* pm, double* pq, double* ps) {
  FASTRES_VEC_TYPES(T);
  const int64_t C = g.C;
  const int64_t NA = rows_num_acc<T>(C);
  A* sums = scratch;               // [NA][C]
  A* dsum = scratch + NA * C;      // [NA][C]
  A* qsum = scratch + 2 * NA * C;  // [NA][C]
  A* mean = scratch + 3 * NA * C;  // [C]
  std::fill(scratch, scratch + 3 * NA * C, A(0));
  // pass 1 (first touch of the unit): per-channel sums. Many vectors per row:
  // 4 rows per accumulator load/store; few: rows in turn over the NA arrays.
  int64_t r = r0;
  if (NA == 1) {
    for (; r + 4 <= r1; r += 4) {
      const T* p = x + r * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        V t = V::loadu(sums + c);
        t = t + IOT::load(p + c);
        t = t + IOT::load(p + C + c);
        t = t + IOT::load(p + 2 * C + c);
        t = t + IOT::load(p + 3 * C + c);
        t.store(sums + c);
      }
      for (; c < C; ++c) {
        A t = sums[c];
        for (int k = 0; k < 4; ++k) t += static_cast<A>(p[k * C + c]);
        sums[c] = t;
      }
    }
  }
  for (; r < r1; ++r) {
    const T* p = x + r * C;
    A* acc = sums + ((r - r0) & (NA - 1)) * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) (V::loadu(acc + c) + IOT::load(p + c)).store(acc + c);
    for (; c < C; ++c) acc[c] += static_cast<A>(p[c]);
  }
  const int64_t cnt = r1 - r0;
  const A inv = A(1) / static_cast<A>(cnt);
  for (int64_t c = 0; c < C; ++c) {
    A t = sums[c];
    for (int64_t k = 1; k < NA; ++k) t += sums[k * C + c];
    ps[c] = static_cast<double>(t);
    mean[c] = t * inv;
  }
  // pass 2 (unit is cache resident): sum of (x-m), (x-m)^2
  r = r0;
  if (NA == 1) {
    for (; r + 4 <= r1; r += 4) {
      const T* p = x + r * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        const V mv = V::loadu(mean + c);
        V d = V::loadu(dsum + c);
        V q = V::loadu(qsum + c);
        for (int k = 0; k < 4; ++k) {
          const V e = IOT::load(p + k * C + c) - mv;
          d = d + e;
          q = at::vec::fmadd(e, e, q);
        }
        d.store(dsum + c);
        q.store(qsum + c);
      }
      for (; c < C; ++c) {
        for (int k = 0; k < 4; ++k) {
          const A e = static_cast<A>(p[k * C + c]) - mean[c];
          dsum[c] += e;
          qsum[c] += e * e;
        }
      }
    }
  }
  for (; r < r1; ++r) {
    const T* p = x + r * C;
    const int64_t k = (r - r0) & (NA - 1);
    A* d = dsum + k * C;
    A* q = qsum + k * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const V e = IOT::load(p + c) - V::loadu(mean + c);
      (V::loadu(d + c) + e).store(d + c);
      at::vec::fmadd(e, e, V::loadu(q + c)).store(q + c);
    }
    for (; c < C; ++c) {
      const A e = static_cast<A>(p[c]) - mean[c];
      d[c] += e;
      q[c] += e * e;
    }
  }
  const double inv_n = 1.0 / static_cast<double>(cnt);  // (no division per channel)
  for (int64_t c = 0; c < C; ++c) {
    double D = 0, Q = 0;
    for (int64_t k = 0; k < NA; ++k) {
      D += static_cast<double>(dsum[k * C + c]);
      Q += static_cast<double>(qsum[k * C + c]);
    }
    pm[c] = static_cast<double>(mean[c]) + D * inv_n;
    pq[c] = clamp_nonneg(Q - D * D * inv_n);
  }
}

// Per-channel mean / biased var (double) of x.
//
// Non-finite inputs follow aten (mean = sum(x)/M, var = mean((x-mean)^2)): a
// channel with +-Inf has mean +-Inf (or NaN for both signs) and var NaN. The
// stable path would give NaN for that mean (inf - inf in the merges), so the
// plain sums are carried along and used whenever the merged mean is not finite.
template <typename T>
void channel_stats(const Geom& g, const T* x, std::vector<double>& mean, std::vector<double>& var) {
  const Partition P = make_partition(g);
  const int64_t C = g.C, M = g.M();
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  std::vector<double> total(C, 0.0);
  if (!g.rows) {
    std::vector<double> pm(P.U), pq(P.U), ps(P.U);
    at::parallel_for(0, P.U, P.grain, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
        const int64_t c = u / P.J, j = u % P.J;
        unit_stats_nchw<T>(g, x, c, chunk_start(M, P.J, j), chunk_start(M, P.J, j + 1), pm[u], pq[u],
                           ps[u]);
      }
    });
    at::parallel_for(0, C, P.combine_grain, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        Welford w;
        double sum = 0;
        for (int64_t j = 0; j < P.J; ++j) {
          const double nb = static_cast<double>(chunk_start(M, P.J, j + 1) - chunk_start(M, P.J, j));
          w.merge(nb, pm[c * P.J + j], pq[c * P.J + j]);
          sum += ps[c * P.J + j];
        }
        mean[c] = w.mean;
        var[c] = w.m2 / w.n;
        total[c] = sum;
      }
    });
  } else {
    std::vector<double> pm(P.U * C), pq(P.U * C), ps(P.U * C);
    at::parallel_for(0, P.U, P.grain, [&](int64_t b, int64_t e) {
      std::vector<acc_of<T>> scratch(16 * C);
      for (int64_t u = b; u < e; ++u) {
        const int64_t r0 = u * P.R, r1 = std::min(M, r0 + P.R);
        unit_stats_rows<T>(g, x, r0, r1, scratch.data(), pm.data() + u * C, pq.data() + u * C,
                           ps.data() + u * C);
      }
    });
    // Chan merge in unit order. All channels share the unit counts, so the
    // merge coefficients are computed once per unit and the channel loop is a
    // plain (vectorizable) loop; per channel the arithmetic is exactly
    // Welford::merge in unit order.
    at::parallel_for(0, C, P.combine_grain, [&](int64_t b, int64_t e) {
      double n = 0;
      for (int64_t c = b; c < e; ++c) {
        mean[c] = 0;
        var[c] = 0;  // holds M2 until the end
      }
      for (int64_t u = 0; u < P.U; ++u) {
        const int64_t r0 = u * P.R, r1 = std::min(M, r0 + P.R);
        const double nb = static_cast<double>(r1 - r0);
        const double nt = n + nb;
        const double f1 = nb / nt, f2 = n * nb / nt;
        const double* um = pm.data() + u * C;
        const double* uq = pq.data() + u * C;
        const double* us = ps.data() + u * C;
        double* mo = mean.data();
        double* qo = var.data();
        double* so = total.data();
        if (u == 0) {
          for (int64_t c = b; c < e; ++c) {
            mo[c] = um[c];
            qo[c] = uq[c];
            so[c] = us[c];
          }
        } else {
          for (int64_t c = b; c < e; ++c) {
            const double delta = um[c] - mo[c];
            mo[c] += delta * f1;
            qo[c] += uq[c] + delta * delta * f2;
            so[c] += us[c];
          }
        }
        n = nt;
      }
      for (int64_t c = b; c < e; ++c) var[c] /= n;
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    if (!std::isfinite(mean[c])) mean[c] = total[c] / static_cast<double>(M);
  }
}

// Stats of one NCHW channel, its units in order: exactly the arithmetic of the
// NCHW branch of channel_stats (used by the channel-blocked path).
template <typename T>
inline void nchw_channel_stats(const Geom& g, const T* x, const Partition& P, int64_t c, double& mean,
                               double& var) {
  const int64_t M = g.M();
  Welford w;
  double sum = 0;
  for (int64_t j = 0; j < P.J; ++j) {
    const int64_t l0 = chunk_start(M, P.J, j), l1 = chunk_start(M, P.J, j + 1);
    double um, uq, us;
    unit_stats_nchw<T>(g, x, c, l0, l1, um, uq, us);
    w.merge(static_cast<double>(l1 - l0), um, uq);
    sum += us;
  }
  mean = std::isfinite(w.mean) ? w.mean : sum / static_cast<double>(M);
  var = w.m2 / w.n;
}

// NCHW channel-blocked passes: one task handles whole channels (reduction, then
// the element-wise sweep while the channel's data is still in L2), which saves a
// read of the big tensors from L3/DRAM. Used when a channel fits the L2 budget
// and there are enough channels for the threads. Same units, same merge order as
// the two-phase path: bitwise identical results.
constexpr int64_t kL2Budget = int64_t(1) << 20;

inline bool channel_blocked(const Geom& g, int64_t l2_bytes_per_element) {
  return !g.rows && g.C >= 2 * static_cast<int64_t>(at::get_num_threads()) &&
         g.M() * l2_bytes_per_element <= kL2Budget;
}

// ---------------------------------------------------------------------------
// Element-wise: y = act((x - center[c]) * scale[c] + shift[c] (+ res)).

// One contiguous run of a single channel.
template <typename T, bool RELU, bool RES>
inline void apply_plane(const T* xp, const T* rp, T* yp, int64_t len, acc_of<T> cs, acc_of<T> ss,
                        acc_of<T> bs) {
  FASTRES_VEC_TYPES(T);
  const V cv(cs), sv(ss), bv(bs);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    V z = at::vec::fmadd(IOT::load(xp + i) - cv, sv, bv);
    if constexpr (RES) z = z + IOT::load(rp + i);
    if constexpr (RELU) z = relu_v(z);
    IOT::store(yp + i, z);
  }
  for (; i < len; ++i) {
    A z = (static_cast<A>(xp[i]) - cs) * ss + bs;
    if constexpr (RES) z += static_cast<A>(rp[i]);
    if constexpr (RELU) z = relu_s(z);
    yp[i] = static_cast<T>(z);
  }
}

template <typename T, bool RELU, bool RES>
void apply_affine(const Geom& g, const T* x, const T* res, T* y, const acc_of<T>* center,
                  const acc_of<T>* scale, const acc_of<T>* shift) {
  FASTRES_VEC_TYPES(T);
  const int64_t C = g.C, M = g.M(), HW = g.HW;
  if (!g.rows) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / HW), [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const int64_t off = plane * HW;
        apply_plane<T, RELU, RES>(x + off, RES ? res + off : nullptr, y + off, HW, center[c], scale[c],
                                  shift[c]);
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t off = row * C;
        const T* xp = x + off;
        const T* rp = RES ? res + off : nullptr;
        T* yp = y + off;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          V z = at::vec::fmadd(IOT::load(xp + c) - V::loadu(center + c), V::loadu(scale + c),
                               V::loadu(shift + c));
          if constexpr (RES) z = z + IOT::load(rp + c);
          if constexpr (RELU) z = relu_v(z);
          IOT::store(yp + c, z);
        }
        for (; c < C; ++c) {
          A z = (static_cast<A>(xp[c]) - center[c]) * scale[c] + shift[c];
          if constexpr (RES) z += static_cast<A>(rp[c]);
          if constexpr (RELU) z = relu_s(z);
          yp[c] = static_cast<T>(z);
        }
      }
    });
  }
}

template <typename T>
void apply_affine_dispatch(bool relu, const Geom& g, const T* x, const T* res, T* y,
                           const acc_of<T>* center, const acc_of<T>* scale, const acc_of<T>* shift) {
  if (relu) {
    if (res) apply_affine<T, true, true>(g, x, res, y, center, scale, shift);
    else apply_affine<T, true, false>(g, x, res, y, center, scale, shift);
  } else {
    if (res) apply_affine<T, false, true>(g, x, res, y, center, scale, shift);
    else apply_affine<T, false, false>(g, x, res, y, center, scale, shift);
  }
}

template <typename A>
std::vector<A> param_or(const void* p, int64_t C, A dflt) {
  if (p) {
    const A* q = static_cast<const A*>(p);
    return std::vector<A>(q, q + C);
  }
  return std::vector<A>(C, dflt);
}

// Forward per-channel outputs and coefficients from the double statistics.
template <typename A>
inline void fwd_channel_params(double mean, double var, A w, double eps, A& m_out, A& v_out, A& scale) {
  m_out = static_cast<A>(mean);
  v_out = static_cast<A>(var);
  const A invstd = A(1) / std::sqrt(v_out + static_cast<A>(eps));
  scale = invstd * w;
}

template <typename T, bool RELU, bool RES>
void bn_fwd_blocked(const BnFwdArgs& a, const acc_of<T>* w, const acc_of<T>* b) {
  using A = acc_of<T>;
  const Geom& g = a.g;
  const Partition P = make_partition(g);
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.res);
  T* y = static_cast<T*>(a.y);
  A* mean_out = static_cast<A*>(a.mean);
  A* var_out = static_cast<A*>(a.var);
  at::parallel_for(0, g.C, std::max<int64_t>(1, kGrain / g.M()), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double mean, var;
      nchw_channel_stats<T>(g, x, P, c, mean, var);
      A m, v, scale;
      fwd_channel_params<A>(mean, var, w[c], a.eps, m, v, scale);
      mean_out[c] = m;
      var_out[c] = v;
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t off = (n * g.C + c) * g.HW;
        apply_plane<T, RELU, RES>(x + off, RES ? res + off : nullptr, y + off, g.HW, m, scale, b[c]);
      }
    }
  });
}

template <typename T>
void bn_fwd_impl(const BnFwdArgs& a) {
  using A = acc_of<T>;
  const Geom& g = a.g;
  const int64_t C = g.C;
  const std::vector<A> w = param_or<A>(a.weight, C, A(1));
  const std::vector<A> b = param_or<A>(a.bias, C, A(0));
  if (channel_blocked(g, sizeof(T))) {
    if (a.relu) {
      if (a.res) bn_fwd_blocked<T, true, true>(a, w.data(), b.data());
      else bn_fwd_blocked<T, true, false>(a, w.data(), b.data());
    } else {
      if (a.res) bn_fwd_blocked<T, false, true>(a, w.data(), b.data());
      else bn_fwd_blocked<T, false, false>(a, w.data(), b.data());
    }
    return;
  }
  std::vector<double> mean, var;
  channel_stats<T>(g, static_cast<const T*>(a.x), mean, var);
  std::vector<A> center(C), scale(C);
  A* mean_out = static_cast<A*>(a.mean);
  A* var_out = static_cast<A*>(a.var);
  for (int64_t c = 0; c < C; ++c) {
    fwd_channel_params<A>(mean[c], var[c], w[c], a.eps, mean_out[c], var_out[c], scale[c]);
    center[c] = mean_out[c];
  }
  apply_affine_dispatch<T>(a.relu, g, static_cast<const T*>(a.x), static_cast<const T*>(a.res),
                           static_cast<T*>(a.y), center.data(), scale.data(), b.data());
}

template <typename T>
void affine_fwd_impl(const AffineFwdArgs& a) {
  using A = acc_of<T>;
  const int64_t C = a.g.C;
  const std::vector<A> center(C, A(0));
  const std::vector<A> scale = param_or<A>(a.scale, C, A(1));
  const std::vector<A> shift = param_or<A>(a.shift, C, A(0));
  apply_affine_dispatch<T>(a.relu, a.g, static_cast<const T*>(a.x), static_cast<const T*>(a.res),
                           static_cast<T*>(a.y), center.data(), scale.data(), shift.data());
}

// ---------------------------------------------------------------------------
// Backward reductions: per channel S1 = sum(dz), S2 = sum(dz * (x - center)).
// dz = mask(gy, y) when RELU. GZ: also store dz into gz. GX: also store
// gx = dz * gscale[c] (affine backward: all in one pass).

template <typename T, bool RELU, bool GZ, bool GX>
inline void unit_dsum_nchw(const Geom& g, const T* gy, const T* x, const T* y, T* gz, T* gx,
                           acc_of<T> center, acc_of<T> gscale, int64_t c, int64_t l0, int64_t l1,
                           double& s1_out, double& s2_out) {
  FASTRES_VEC_TYPES(T);
  const V cv(center), kv(gscale);
  V s1a(0), s1b(0), s2a(0), s2b(0);
  A t1 = A(0), t2 = A(0);
  nchw_runs(g, c, l0, l1, [&](int64_t off, int64_t len) {
    int64_t i = 0;
    auto body = [&](int64_t k, V& s1, V& s2) {
      V d = IOT::load(gy + off + k);
      if constexpr (RELU) d = mask_v(d, IOT::load(y + off + k));
      if constexpr (GZ) IOT::store(gz + off + k, d);
      if constexpr (GX) IOT::store(gx + off + k, d * kv);
      s1 = s1 + d;
      s2 = at::vec::fmadd(d, IOT::load(x + off + k) - cv, s2);
    };
    for (; i + 2 * W <= len; i += 2 * W) {
      body(i, s1a, s2a);
      body(i + W, s1b, s2b);
    }
    for (; i + W <= len; i += W) body(i, s1a, s2a);
    for (; i < len; ++i) {
      const int64_t k = off + i;
      A d = static_cast<A>(gy[k]);
      if constexpr (RELU) d = mask_s(d, static_cast<A>(y[k]));
      if constexpr (GZ) gz[k] = static_cast<T>(d);
      if constexpr (GX) gx[k] = static_cast<T>(d * gscale);
      t1 += d;
      t2 += d * (static_cast<A>(x[k]) - center);
    }
  });
  s1_out = static_cast<double>(hsum(s1a + s1b) + t1);
  s2_out = static_cast<double>(hsum(s2a + s2b) + t2);
}

// scratch: 8*C acc values (NA <= 4 arrays of S1 and S2 partials, see rows_num_acc).
template <typename T, bool RELU, bool GZ, bool GX>
inline void unit_dsum_rows(const Geom& g, const T* gy, const T* x, const T* y, T* gz, T* gx,
                           const acc_of<T>* center, const acc_of<T>* gscale, int64_t r0, int64_t r1,
                           acc_of<T>* scratch, double* s1_out, double* s2_out) {
  FASTRES_VEC_TYPES(T);
  const int64_t C = g.C;
  const int64_t NA = rows_num_acc<T>(C);
  A* s1 = scratch;           // [NA][C]
  A* s2 = scratch + NA * C;  // [NA][C]
  std::fill(scratch, scratch + 2 * NA * C, A(0));
  int64_t r = r0;
  if (NA == 1) {  // many vectors per row: 4 rows per accumulator load/store
    for (; r + 4 <= r1; r += 4) {
      const int64_t base = r * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        const V cv = V::loadu(center + c);
        const V kv = GX ? V::loadu(gscale + c) : V(0);
        V a1 = V::loadu(s1 + c), a2 = V::loadu(s2 + c);
        for (int j = 0; j < 4; ++j) {
          const int64_t k = base + j * C + c;
          V d = IOT::load(gy + k);
          if constexpr (RELU) d = mask_v(d, IOT::load(y + k));
          if constexpr (GZ) IOT::store(gz + k, d);
          if constexpr (GX) IOT::store(gx + k, d * kv);
          a1 = a1 + d;
          a2 = at::vec::fmadd(d, IOT::load(x + k) - cv, a2);
        }
        a1.store(s1 + c);
        a2.store(s2 + c);
      }
      for (; c < C; ++c) {
        for (int j = 0; j < 4; ++j) {
          const int64_t k = base + j * C + c;
          A d = static_cast<A>(gy[k]);
          if constexpr (RELU) d = mask_s(d, static_cast<A>(y[k]));
          if constexpr (GZ) gz[k] = static_cast<T>(d);
          if constexpr (GX) gx[k] = static_cast<T>(d * gscale[c]);
          s1[c] += d;
          s2[c] += d * (static_cast<A>(x[k]) - center[c]);
        }
      }
    }
  }
  for (; r < r1; ++r) {
    const int64_t base = r * C;
    A* a1p = s1 + ((r - r0) & (NA - 1)) * C;
    A* a2p = s2 + ((r - r0) & (NA - 1)) * C;
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      const int64_t k = base + c;
      V d = IOT::load(gy + k);
      if constexpr (RELU) d = mask_v(d, IOT::load(y + k));
      if constexpr (GZ) IOT::store(gz + k, d);
      if constexpr (GX) IOT::store(gx + k, d * V::loadu(gscale + c));
      (V::loadu(a1p + c) + d).store(a1p + c);
      at::vec::fmadd(d, IOT::load(x + k) - V::loadu(center + c), V::loadu(a2p + c)).store(a2p + c);
    }
    for (; c < C; ++c) {
      const int64_t k = base + c;
      A d = static_cast<A>(gy[k]);
      if constexpr (RELU) d = mask_s(d, static_cast<A>(y[k]));
      if constexpr (GZ) gz[k] = static_cast<T>(d);
      if constexpr (GX) gx[k] = static_cast<T>(d * gscale[c]);
      a1p[c] += d;
      a2p[c] += d * (static_cast<A>(x[k]) - center[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < NA; ++k) {
      t1 += static_cast<double>(s1[k * C + c]);
      t2 += static_cast<double>(s2[k * C + c]);
    }
    s1_out[c] = t1;
    s2_out[c] = t2;
  }
}

// Per-channel sums over fixed units, combined in unit order (double).
template <typename T, bool RELU, bool GZ, bool GX>
void channel_dsums(const Geom& g, const T* gy, const T* x, const T* y, T* gz, T* gx,
                   const acc_of<T>* center, const acc_of<T>* gscale, std::vector<double>& S1,
                   std::vector<double>& S2) {
  const Partition P = make_partition(g);
  const int64_t C = g.C, M = g.M();
  S1.assign(C, 0.0);
  S2.assign(C, 0.0);
  if (!g.rows) {
    std::vector<double> p1(P.U), p2(P.U);
    at::parallel_for(0, P.U, P.grain, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
        const int64_t c = u / P.J, j = u % P.J;
        unit_dsum_nchw<T, RELU, GZ, GX>(g, gy, x, y, gz, gx, center[c], GX ? gscale[c] : acc_of<T>(0),
                                        c, chunk_start(M, P.J, j), chunk_start(M, P.J, j + 1),
                                        p1[u], p2[u]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int64_t j = 0; j < P.J; ++j) {
        a += p1[c * P.J + j];
        b += p2[c * P.J + j];
      }
      S1[c] = a;
      S2[c] = b;
    }
  } else {
    std::vector<double> p1(P.U * C), p2(P.U * C);
    at::parallel_for(0, P.U, P.grain, [&](int64_t b, int64_t e) {
      std::vector<acc_of<T>> scratch(8 * C);
      for (int64_t u = b; u < e; ++u) {
        const int64_t r0 = u * P.R, r1 = std::min(M, r0 + P.R);
        unit_dsum_rows<T, RELU, GZ, GX>(g, gy, x, y, gz, gx, center, gscale, r0, r1, scratch.data(),
                                        p1.data() + u * C, p2.data() + u * C);
      }
    });
    // Sum in unit order; channel loop innermost (contiguous, vectorizable).
    at::parallel_for(0, C, P.combine_grain, [&](int64_t b, int64_t e) {
      for (int64_t u = 0; u < P.U; ++u) {
        const double* a1 = p1.data() + u * C;
        const double* a2 = p2.data() + u * C;
        for (int64_t c = b; c < e; ++c) {
          S1[c] += a1[c];
          S2[c] += a2[c];
        }
      }
    });
  }
}

// One contiguous run [off, off + len) of a single channel of the dx pass.
template <typename T, bool RELU, bool FROM_GZ>
inline void bwd_apply_plane(const T* gy, const T* x, const T* y, const T* gz, T* gx, int64_t off, int64_t len,
                            acc_of<T> cs, acc_of<T> as, acc_of<T> bs, acc_of<T> ds) {
  FASTRES_VEC_TYPES(T);
  const V cv(cs), av(as), bv(bs), dv(ds);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    const int64_t k = off + i;
    V d;
    if constexpr (FROM_GZ) {
      d = IOT::load(gz + k);
    } else {
      d = IOT::load(gy + k);
      if constexpr (RELU) d = mask_v(d, IOT::load(y + k));
    }
    IOT::store(gx + k, at::vec::fmadd(av, d, at::vec::fmadd(bv, IOT::load(x + k) - cv, dv)));
  }
  for (; i < len; ++i) {
    const int64_t k = off + i;
    A d;
    if constexpr (FROM_GZ) {
      d = static_cast<A>(gz[k]);
    } else {
      d = static_cast<A>(gy[k]);
      if constexpr (RELU) d = mask_s(d, static_cast<A>(y[k]));
    }
    gx[k] = static_cast<T>(as * d + (bs * (static_cast<A>(x[k]) - cs) + ds));
  }
}

// gx = ka[c]*dz + kb[c]*(x - center[c]) + kd[c]; dz from gz (FROM_GZ) or mask(gy, y).
template <typename T, bool RELU, bool FROM_GZ>
void bn_bwd_apply(const Geom& g, const T* gy, const T* x, const T* y, const T* gz, T* gx,
                  const acc_of<T>* center, const acc_of<T>* ka, const acc_of<T>* kb,
                  const acc_of<T>* kd) {
  FASTRES_VEC_TYPES(T);
  const int64_t C = g.C, M = g.M(), HW = g.HW;
  auto vdz = [&](int64_t k) {
    if constexpr (FROM_GZ) {
      return IOT::load(gz + k);
    } else {
      V d = IOT::load(gy + k);
      if constexpr (RELU) d = mask_v(d, IOT::load(y + k));
      return d;
    }
  };
  auto sdz = [&](int64_t k) {
    if constexpr (FROM_GZ) {
      return static_cast<A>(gz[k]);
    } else {
      A d = static_cast<A>(gy[k]);
      if constexpr (RELU) d = mask_s(d, static_cast<A>(y[k]));
      return d;
    }
  };
  if (!g.rows) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / HW), [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        bwd_apply_plane<T, RELU, FROM_GZ>(gy, x, y, gz, gx, plane * HW, HW, center[c], ka[c], kb[c], kd[c]);
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t off = row * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          const int64_t k = off + c;
          const V r = at::vec::fmadd(
              V::loadu(ka + c), vdz(k),
              at::vec::fmadd(V::loadu(kb + c), IOT::load(x + k) - V::loadu(center + c), V::loadu(kd + c)));
          IOT::store(gx + k, r);
        }
        for (; c < C; ++c) {
          const int64_t k = off + c;
          gx[k] = static_cast<T>(ka[c] * sdz(k) + (kb[c] * (static_cast<A>(x[k]) - center[c]) + kd[c]));
        }
      }
    });
  }
}

// Backward per-channel outputs and dx coefficients from the double sums
// S1 = sum dz, S2 = sum dz*(x-mean).
template <typename A>
inline void bwd_channel_params(double S1, double S2, A var, A w, double eps, double M, A& gw, A& gb, A& ka,
                               A& kb, A& kd) {
  const A invstd_a = A(1) / std::sqrt(var + static_cast<A>(eps));
  const double invstd = static_cast<double>(invstd_a);
  const double gbd = S1;
  const double gwd = S2 * invstd;
  gb = static_cast<A>(gbd);
  gw = static_cast<A>(gwd);
  const double k = static_cast<double>(w) * invstd;
  ka = static_cast<A>(k);
  kb = static_cast<A>(-k * invstd * gwd / M);
  kd = static_cast<A>(-k * gbd / M);
}

// (the pointers are bn_bwd_t's, typed)
template <typename T, bool RELU, bool GZ>
void bn_bwd_blocked(const BnBwdArgs& a, const T* gy, const T* x, const T* y, T* gx, T* gz,
                    const acc_of<T>* mean, const acc_of<T>* var, const acc_of<T>* w, acc_of<T>* gw_out,
                    acc_of<T>* gb_out) {
  using A = acc_of<T>;
  const Geom& g = a.g;
  const Partition P = make_partition(g);
  const int64_t M = g.M();
  at::parallel_for(0, g.C, std::max<int64_t>(1, kGrain / M), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double S1 = 0, S2 = 0;
      for (int64_t j = 0; j < P.J; ++j) {
        double p1, p2;
        unit_dsum_nchw<T, RELU, GZ, false>(g, gy, x, y, gz, nullptr, mean[c], A(0), c, chunk_start(M, P.J, j),
                                           chunk_start(M, P.J, j + 1), p1, p2);
        S1 += p1;
        S2 += p2;
      }
      A ka, kb, kd;
      bwd_channel_params<A>(S1, S2, var[c], w[c], a.eps, static_cast<double>(M), gw_out[c], gb_out[c], ka,
                            kb, kd);
      for (int64_t n = 0; n < g.N; ++n)
        bwd_apply_plane<T, RELU, GZ>(gy, x, y, gz, gx, (n * g.C + c) * g.HW, g.HW, mean[c], ka, kb, kd);
    }
  });
}

template <typename T, bool RELU>
void bn_bwd_t(const BnBwdArgs& a) {
  using A = acc_of<T>;
  const Geom& g = a.g;
  const int64_t C = g.C;
  const double M = static_cast<double>(g.M());
  const T* gy = static_cast<const T*>(a.gy);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* gx = static_cast<T*>(a.gx);
  T* gz = static_cast<T*>(a.gz);
  const A* mean = static_cast<const A*>(a.mean);
  const A* var = static_cast<const A*>(a.var);
  A* gw_out = static_cast<A*>(a.gw);
  A* gb_out = static_cast<A*>(a.gb);
  const std::vector<A> w = param_or<A>(a.weight, C, A(1));
  // L2-resident per channel: gy, y (relu) and x for the reduction; gz or (gy, y) and x for dx.
  if (channel_blocked(g, static_cast<int64_t>(sizeof(T)) * (RELU ? 3 : 2) + (gz ? static_cast<int64_t>(sizeof(T)) : 0))) {
    if (gz) bn_bwd_blocked<T, RELU, true>(a, gy, x, y, gx, gz, mean, var, w.data(), gw_out, gb_out);
    else bn_bwd_blocked<T, RELU, false>(a, gy, x, y, gx, gz, mean, var, w.data(), gw_out, gb_out);
    return;
  }
  std::vector<double> S1, S2;
  if (gz) channel_dsums<T, RELU, true, false>(g, gy, x, y, gz, nullptr, mean, nullptr, S1, S2);
  else channel_dsums<T, RELU, false, false>(g, gy, x, y, nullptr, nullptr, mean, nullptr, S1, S2);
  std::vector<A> ka(C), kb(C), kd(C);
  for (int64_t c = 0; c < C; ++c)
    bwd_channel_params<A>(S1[c], S2[c], var[c], w[c], a.eps, M, gw_out[c], gb_out[c], ka[c], kb[c], kd[c]);
  if (gz) bn_bwd_apply<T, RELU, true>(g, gy, x, y, gz, gx, mean, ka.data(), kb.data(), kd.data());
  else bn_bwd_apply<T, RELU, false>(g, gy, x, y, nullptr, gx, mean, ka.data(), kb.data(), kd.data());
}

template <typename T>
void bn_bwd_impl(const BnBwdArgs& a) {
  if (a.relu) bn_bwd_t<T, true>(a);
  else bn_bwd_t<T, false>(a);
}

// affine backward without parameter gradients: pure element-wise.
template <typename T, bool RELU, bool GZ>
void affine_bwd_elementwise(const Geom& g, const T* gy, const T* y, T* gx, T* gz, const acc_of<T>* scale) {
  FASTRES_VEC_TYPES(T);
  const int64_t C = g.C, M = g.M(), HW = g.HW;
  auto vbody = [&](int64_t k, const V& sv) {
    V d = IOT::load(gy + k);
    if constexpr (RELU) d = mask_v(d, IOT::load(y + k));
    if constexpr (GZ) IOT::store(gz + k, d);
    IOT::store(gx + k, d * sv);
  };
  auto sbody = [&](int64_t k, A s) {
    A d = static_cast<A>(gy[k]);
    if constexpr (RELU) d = mask_s(d, static_cast<A>(y[k]));
    if constexpr (GZ) gz[k] = static_cast<T>(d);
    gx[k] = static_cast<T>(d * s);
  };
  if (!g.rows) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / HW), [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane) {
        const int64_t c = plane % C;
        const int64_t off = plane * HW;
        const A s = scale[c];
        const V sv(s);
        int64_t i = 0;
        for (; i + W <= HW; i += W) vbody(off + i, sv);
        for (; i < HW; ++i) sbody(off + i, s);
      }
    });
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t off = row * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) vbody(off + c, V::loadu(scale + c));
        for (; c < C; ++c) sbody(off + c, scale[c]);
      }
    });
  }
}

template <typename T, bool RELU>
void affine_bwd_t(const AffineBwdArgs& a) {
  using A = acc_of<T>;
  const Geom& g = a.g;
  const int64_t C = g.C;
  const T* gy = static_cast<const T*>(a.gy);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* gx = static_cast<T*>(a.gx);
  T* gz = static_cast<T*>(a.gz);
  const std::vector<A> scale = param_or<A>(a.scale, C, A(1));
  if (a.gscale) {
    const std::vector<A> zero(C, A(0));
    std::vector<double> S1, S2;
    if (gz) channel_dsums<T, RELU, true, true>(g, gy, x, y, gz, gx, zero.data(), scale.data(), S1, S2);
    else channel_dsums<T, RELU, false, true>(g, gy, x, y, nullptr, gx, zero.data(), scale.data(), S1, S2);
    A* gs = static_cast<A*>(a.gscale);
    A* gb = static_cast<A*>(a.gshift);
    for (int64_t c = 0; c < C; ++c) {
      gs[c] = static_cast<A>(S2[c]);
      gb[c] = static_cast<A>(S1[c]);
    }
  } else {
    if (gz) affine_bwd_elementwise<T, RELU, true>(g, gy, y, gx, gz, scale.data());
    else affine_bwd_elementwise<T, RELU, false>(g, gy, y, gx, nullptr, scale.data());
  }
}

template <typename T>
void affine_bwd_impl(const AffineBwdArgs& a) {
  if (a.relu) affine_bwd_t<T, true>(a);
  else affine_bwd_t<T, false>(a);
}

// ---------------------------------------------------------------------------
template <template <typename> class Fn, typename Args>
void by_dtype(const Args& a) {
  switch (a.dt) {
    case DType::kF64: Fn<double>::run(a); break;
    case DType::kF32: Fn<float>::run(a); break;
    case DType::kBF16: Fn<c10::BFloat16>::run(a); break;
    case DType::kF16: Fn<c10::Half>::run(a); break;
  }
}

template <typename T> struct BnFwdFn { static void run(const BnFwdArgs& a) { bn_fwd_impl<T>(a); } };
template <typename T> struct AffineFwdFn { static void run(const AffineFwdArgs& a) { affine_fwd_impl<T>(a); } };
template <typename T> struct BnBwdFn { static void run(const BnBwdArgs& a) { bn_bwd_impl<T>(a); } };
template <typename T> struct AffineBwdFn { static void run(const AffineBwdArgs& a) { affine_bwd_impl<T>(a); } };

void bn_fwd_entry(const BnFwdArgs& a) { by_dtype<BnFwdFn>(a); }
void affine_fwd_entry(const AffineFwdArgs& a) { by_dtype<AffineFwdFn>(a); }
void bn_bwd_entry(const BnBwdArgs& a) { by_dtype<BnBwdFn>(a); }
void affine_bwd_entry(const AffineBwdArgs& a) { by_dtype<AffineBwdFn>(a); }

#undef FASTRES_VEC_TYPES
#define FASTRES_STR2(x) #x
#define FASTRES_STR(x) FASTRES_STR2(x)

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&bn_fwd_entry, &affine_fwd_entry, &bn_bwd_entry, &affine_bwd_entry,
                         FASTRES_STR(CPU_CAPABILITY)};
  return k;
}

}  // namespace fastres::cpu::CPU_CAPABILITY
