// Stand-ins for the Metal built-ins our kernels use, so g++ can compile and run a kernel's text
// on machines without Metal (tests/metal_stand_in.py drives it; docs/metal-kernels.md).
// Only what the kernels need: a kernel using anything else fails to compile here, on purpose.
//
// Threads of a threadgroup are coroutines (ucontext) run one at a time, lowest index first: a
// thread runs until it reaches a `threadgroup_barrier` or a simdgroup function, where it waits
// for the others. A simdgroup function resolves once every live lane of the simdgroup (32 lanes,
// in lock-step on a GPU) has reached it, over the array of the lanes' values; a barrier once
// every live thread of the threadgroup has. So one simdgroup runs as far as it can before the
// next one starts, and a missing barrier shows as a read of memory not yet written.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef uint64_t ulong;

struct uint3 {
  uint x, y, z;
};

// Metal's half: IEEE binary16, float -> half rounds to nearest even, as _Float16 does.
typedef _Float16 half;

// MLX's bfloat16_t conversions (mlx/types/bf16.h): round to nearest even, any nan -> 0x7FC0.
struct bfloat16_t {
  uint16_t bits;

  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) {
      bits = 0x7FC0;
    } else {
      u += ((u >> 16) & 1) + 0x7FFF;
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

namespace metal {
// Metal's min on floats is fmin: a nan operand yields the other one.
inline float min(float a, float b) { return std::fmin(a, b); }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }

namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
}  // namespace precise
}  // namespace metal

// Address-space qualifiers of the signature MLX generates and of thread-local references:
// nothing on a CPU. `threadgroup` declares arrays shared by the threads of a threadgroup: a
// function-static array serves, as threadgroups run one after another (and stale contents
// from the previous threadgroup stand for Metal's uninitialised memory). Use it only to
// declare arrays at the top of a kernel body, never for pointers.
#define device
#define constant
#define thread
#define threadgroup static

namespace stand_in {

constexpr int SIMD_WIDTH = 32;

[[noreturn]] inline void fail(const char* why) {
  std::fprintf(stderr, "stand-in: %s\n", why);
  std::exit(4);
}

enum class Wait { running, barrier, simd, done };
enum class Op { sum, shuffle_down };

struct Lane {
  ucontext_t context;
  std::vector<char> stack;
  Wait wait = Wait::done;
  Op op = Op::sum;
  long ops = 0;  // simdgroup functions called so far: lanes in lock-step agree on it
  ushort delta = 0;
  float value = 0.0f, result = 0.0f;
};

// The threadgroup being run: its threads, whose turn it is, and the scheduler's context.
struct Group {
  std::vector<Lane> lanes;
  ucontext_t scheduler;
  int current = -1;
  void* body = nullptr;  // the driver's callable, run as call(body, thread index)
  void (*call)(void*, int) = nullptr;
};

inline Group& group() {
  static Group g;
  return g;
}

inline void start_lane() {
  Group& g = group();
  g.call(g.body, g.current);
  g.lanes[g.current].wait = Wait::done;  // then uc_link returns to the scheduler
}

// The calling thread waits (`how`) and hands over to the scheduler until released.
inline void yield(Wait how) {
  Group& g = group();
  Lane& lane = g.lanes[g.current];
  lane.wait = how;
  swapcontext(&lane.context, &g.scheduler);
}

// Resolve the simdgroup function lanes [first, first + 32) wait at, once all live ones do.
inline bool resolve_simd(int first) {
  std::vector<Lane>& lanes = group().lanes;
  const int last = std::min<int>(first + SIMD_WIDTH, lanes.size());
  int waiting = -1;
  for (int i = first; i < last; ++i) {
    if (lanes[i].wait == Wait::running || lanes[i].wait == Wait::barrier) return false;
    if (lanes[i].wait == Wait::simd) waiting = i;
  }
  if (waiting < 0) return false;
  for (int i = first; i < last; ++i) {
    const Lane& l = lanes[i];
    if (l.wait == Wait::simd && (l.op != lanes[waiting].op || l.ops != lanes[waiting].ops ||
                                 l.delta != lanes[waiting].delta))
      fail("lanes of a simdgroup reached different simdgroup functions (divergence)");
  }
  float sum = 0.0f;
  for (int i = first; i < last; ++i)
    if (lanes[i].wait == Wait::simd) sum += lanes[i].value;
  for (int i = first; i < last; ++i) {
    Lane& l = lanes[i];
    if (l.wait != Wait::simd) continue;
    if (l.op == Op::sum) {
      l.result = sum;
    } else {
      // The upper `delta` lanes keep their own value: shuffle_down does not wrap around.
      const int from = i + l.delta;
      if (from - first >= SIMD_WIDTH || from >= last) {
        l.result = l.value;
      } else if (lanes[from].wait != Wait::simd) {
        fail("simd_shuffle_down read a lane that has exited");
      } else {
        l.result = lanes[from].value;
      }
    }
    l.wait = Wait::running;
  }
  return true;
}

inline bool resolve_barrier() {
  std::vector<Lane>& lanes = group().lanes;
  bool any = false;
  for (const Lane& l : lanes) {
    if (l.wait == Wait::running || l.wait == Wait::simd) return false;
    any = any || l.wait == Wait::barrier;
  }
  if (!any) return false;
  for (const Lane& l : lanes)
    if (l.wait == Wait::done) fail("a thread exited before a threadgroup_barrier the others reached");
  for (Lane& l : lanes) l.wait = Wait::running;
  return true;
}

// Run `body(i)` for threads i < `threads` of one threadgroup (`live[i]` says which exist).
template <typename Body>
void run_threadgroup(int threads, const std::vector<bool>& live, Body& body) {
  Group& g = group();
  g.body = &body;
  g.call = [](void* b, int i) { (*static_cast<Body*>(b))(i); };
  g.lanes.resize(threads);
  for (int i = 0; i < threads; ++i) {
    Lane& l = g.lanes[i];
    l.wait = live[i] ? Wait::running : Wait::done;
    l.ops = 0;
    if (!live[i]) continue;
    l.stack.resize(1 << 17);
    getcontext(&l.context);
    l.context.uc_stack.ss_sp = l.stack.data();
    l.context.uc_stack.ss_size = l.stack.size();
    l.context.uc_link = &g.scheduler;
    makecontext(&l.context, start_lane, 0);
  }
  while (true) {
    int next = -1;
    for (int i = 0; i < threads && next < 0; ++i)
      if (g.lanes[i].wait == Wait::running) next = i;
    if (next < 0) {
      bool done = true;
      for (const Lane& l : g.lanes) done = done && l.wait == Wait::done;
      if (done) return;
      fail("deadlock: threads wait at a barrier and a simdgroup function at once");
    }
    g.current = next;
    swapcontext(&g.scheduler, &g.lanes[next].context);
    resolve_simd(next - next % SIMD_WIDTH);
    resolve_barrier();
  }
}

inline float simd_op(Op op, float value, ushort delta) {
  Group& g = group();
  Lane& lane = g.lanes[g.current];
  lane.op = op;
  lane.value = value;
  lane.delta = delta;
  lane.ops += 1;
  yield(Wait::simd);
  return g.lanes[g.current].result;
}

}  // namespace stand_in

// Metal's synchronisation and simdgroup functions (float only: what our kernels reduce).
enum class mem_flags { mem_none, mem_device, mem_threadgroup };

inline void threadgroup_barrier(mem_flags) { stand_in::yield(stand_in::Wait::barrier); }

inline float simd_sum(float value) { return stand_in::simd_op(stand_in::Op::sum, value, 0); }

inline float simd_shuffle_down(float value, ushort delta) {
  return stand_in::simd_op(stand_in::Op::shuffle_down, value, delta);
}
