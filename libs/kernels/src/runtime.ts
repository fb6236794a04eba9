import { native } from "./native.js";

export type SimdLevel = "scalar" | "avx2" | "avx512";

export interface CpuInfo {
  avx2: boolean;
  avx512: boolean;
  avx512bf16: boolean;
  avx512vnni: boolean;
  /** The level the kernels use now. */
  simd: SimdLevel;
  threads: number;
}

export function cpuInfo(): CpuInfo {
  return native.cpuInfo();
}

/** Caps the SIMD level (for tests and benchmarks); returns the level in force. */
export function setSimd(level: SimdLevel): SimdLevel {
  return native.setSimd(level);
}

/** Sets the kernel thread count (<= 0: QLORA_THREADS or all cores); returns it. */
export function setThreads(n: number): number {
  return native.setThreads(n);
}
