/**
 * Resident LoRA adapters of one base model: name → engine slot, with a byte budget, LRU eviction
 * of idle adapters and reference counts.
 *
 * Who holds a reference: a request in the RUNNING batch (taken when the scheduler admits it,
 * dropped when it finishes) and a Score call for its duration. Requests waiting in the queue do
 * not: pinning the adapters of a long queue would make the budget meaningless. A queued request
 * only makes sure its adapter is readable and resident when it arrives (so bad files fail the
 * request at once); if the adapter was evicted by the time the request is admitted, it is loaded
 * again and later requests may pass meanwhile. So the memory held is bounded by the budget plus,
 * transiently, the adapters of the running batch.
 *
 * Invariants:
 * - An adapter with references is never removed from the engine. UnloadAdapter (or a reload with
 *   changed files) only detaches the name: the old entry is "retired" and its slot freed when
 *   the last user releases it. New requests for the name load the files again.
 * - Eviction picks idle entries (no references, not just installed), least recently used first.
 *   When nothing is evictable the budget is exceeded temporarily and the excess is evicted as
 *   soon as adapters go idle: a request is never refused or stalled because others are busy.
 * - A just-installed entry is protected until the scheduler's next step has had the chance to
 *   admit the request that wanted it (`endStep`), so two loads cannot keep evicting each other.
 * - Entries are keyed by name + sha256 of the weights file: LoadAdapter after the files changed
 *   replaces the resident copy; unchanged files are a no-op.
 *
 * Events (for the audit log): every load this cache starts on its own (`ensure`: a request named
 * an adapter that is not resident) is reported once when it ends, installed or failed, with the
 * engine id of the request whose need started it; concurrent requests that share the read do not
 * add events. Budget evictions are reported too. Explicit loads and unloads (`load`, `unload`)
 * are not: the RPCs that ask for them are audited themselves.
 */
import { ResourceExhausted } from "@qlora/core";
import type { AdapterRef, ResidentAdapterInfo, QuantMode } from "../protocol.js";

export interface AdapterMeta {
  baseModel: string;
  rank: number;
  alpha: number;
  targetModules: string[];
  useRslora: boolean;
}

export interface AdapterFiles<W> {
  weights: W;
  meta: AdapterMeta;
  bytes: number;
  sha256: string;
}

/** What the cache needs from the engine; the real one wraps libs/model + NativeModel. */
export interface AdapterBackend<W> {
  /** Reads and validates an adapter from disk (async: file I/O must not stall the scheduler). */
  read(ref: AdapterRef): Promise<AdapterFiles<W>>;
  /** Places the weights in an engine slot (slot numbers are the cache's). */
  install(slot: number, weights: W): void;
  remove(slot: number): void;
}

export interface AdapterEntry {
  readonly name: string;
  readonly sha256: string;
  readonly slot: number;
  readonly bytes: number;
  readonly meta: AdapterMeta;
  readonly loadMs: number;
  refs: number;
  lastUsed: number;
  retired: boolean;
  /** Installed since the last scheduler step: not evictable yet. */
  fresh: boolean;
}

/** What the cache did on its own (see the file comment); `trigger` is an engine request id. */
export type AdapterCacheEvent =
  | { kind: "loaded"; ref: AdapterRef; trigger: number | null; entry: AdapterEntry }
  | { kind: "loadFailed"; ref: AdapterRef; trigger: number | null; error: unknown }
  | { kind: "evicted"; entry: AdapterEntry };

export class AdapterCache<W> {
  private readonly current = new Map<string, AdapterEntry>();
  /** Every entry that occupies a slot (current, and retired ones still in use). */
  private readonly resident = new Set<AdapterEntry>();
  private readonly loading = new Map<string, Promise<AdapterEntry | null>>();
  /** Names unloaded while their load was in flight: that load installs nothing. */
  private readonly unloadedWhileLoading = new Set<string>();
  private readonly freeSlots: number[] = [];
  private nextSlot = 0;
  private bytes = 0;
  loads = 0;
  evictions = 0;

  constructor(
    private readonly backend: AdapterBackend<W>,
    readonly budgetBytes: number,
    private readonly model: { name: string; quant: QuantMode },
    private readonly now: () => number = Date.now,
    private readonly onEvent: (e: AdapterCacheEvent) => void = () => {},
  ) {}

  get residentBytes(): number {
    return this.bytes;
  }

  /** Takes a reference if the adapter is resident now (the scheduler's admission path). */
  tryAcquire(name: string): AdapterEntry | null {
    const entry = this.current.get(name);
    if (!entry) return null;
    entry.refs++;
    entry.lastUsed = this.now();
    return entry;
  }

  /**
   * Makes the adapter resident (reading it if needed; concurrent callers share one read) without
   * taking a reference. Rejects with the loader's typed error for missing or bad files. Resolves
   * to null when the adapter was unloaded while it loaded. `trigger` (an engine request id) is
   * reported with the load event when this call starts the read.
   */
  ensure(ref: AdapterRef, trigger: number | null = null): Promise<AdapterEntry | null> {
    const entry = this.current.get(ref.name);
    if (entry) return Promise.resolve(entry);
    let p = this.loading.get(ref.name);
    if (!p) {
      const started = this.now();
      p = this.backend.read(ref).then(
        (files) => {
          this.loading.delete(ref.name);
          if (this.unloadedWhileLoading.delete(ref.name)) return null;
          const loadsBefore = this.loads;
          let installed: AdapterEntry;
          try {
            installed = this.install(ref.name, files, started);
          } catch (e) {
            this.onEvent({ kind: "loadFailed", ref, trigger, error: e });
            throw e;
          }
          // install() returns a copy that a concurrent explicit load put in place meanwhile
          // without loading anything: only a real install is an event.
          if (this.loads !== loadsBefore) this.onEvent({ kind: "loaded", ref, trigger, entry: installed });
          return installed;
        },
        (e: unknown) => {
          this.loading.delete(ref.name);
          this.unloadedWhileLoading.delete(ref.name);
          this.onEvent({ kind: "loadFailed", ref, trigger, error: e });
          throw e;
        },
      );
      this.loading.set(ref.name, p);
    }
    return p;
  }

  /** A reference for as long as the caller needs (Score), loading the adapter if needed. */
  async acquire(ref: AdapterRef, trigger: number | null = null): Promise<AdapterEntry> {
    for (;;) {
      const e = this.tryAcquire(ref.name);
      if (e) return e;
      await this.ensure(ref, trigger);
    }
  }

  /** Drops a reference; frees the slot of a retired entry when its last user is gone. */
  release(entry: AdapterEntry): void {
    if (entry.refs <= 0) throw new Error(`adapter ${entry.name}: release without acquire`);
    entry.refs--;
    entry.lastUsed = this.now();
    if (entry.refs === 0) {
      if (entry.retired) this.drop(entry);
      else this.evictToBudget(0);
    }
  }

  /** Called after every scheduler step: just-installed entries become evictable. */
  endStep(): void {
    let any = false;
    for (const e of this.resident) {
      if (e.fresh) {
        e.fresh = false;
        any = true;
      }
    }
    if (any) this.evictToBudget(0);
  }

  /**
   * Explicit LoadAdapter: makes the current files resident. Same sha256 as the resident copy:
   * nothing to do; different: the new copy replaces it for new requests.
   */
  async load(ref: AdapterRef): Promise<AdapterEntry> {
    const pending = this.loading.get(ref.name);
    if (pending) await pending.catch(() => undefined);
    const started = this.now();
    const files = await this.backend.read(ref);
    const existing = this.current.get(ref.name);
    if (existing && existing.sha256 === files.sha256) {
      existing.lastUsed = this.now();
      return existing;
    }
    return this.install(ref.name, files, started);
  }

  /** Detaches the name; returns false when it was neither resident nor loading. */
  unload(name: string): boolean {
    let found = false;
    if (this.loading.has(name)) {
      this.unloadedWhileLoading.add(name);
      found = true;
    }
    const entry = this.current.get(name);
    if (entry) {
      this.retire(entry);
      found = true;
    }
    return found;
  }

  list(): ResidentAdapterInfo[] {
    return [...this.resident].map((e) => this.describe(e));
  }

  describe(e: AdapterEntry): ResidentAdapterInfo {
    return {
      name: e.name,
      model: this.model.name,
      quant: this.model.quant,
      sha256: e.sha256,
      baseModel: e.meta.baseModel,
      rank: e.meta.rank,
      alpha: e.meta.alpha,
      targetModules: e.meta.targetModules,
      useRslora: e.meta.useRslora,
      residentBytes: e.bytes,
      lastUsedAt: e.lastUsed,
      loadMs: e.loadMs,
      refs: e.refs,
      unloading: e.retired,
    };
  }

  /** Retires every adapter; idle ones are removed now (model shutdown). */
  clear(): void {
    for (const e of [...this.resident]) this.retire(e);
  }

  private install(name: string, files: AdapterFiles<W>, started: number): AdapterEntry {
    if (files.bytes > this.budgetBytes) {
      throw new ResourceExhausted(
        `adapter ${name} needs ${files.bytes} bytes, more than the adapter budget of ${this.budgetBytes} bytes`,
      );
    }
    // A concurrent load may have installed the same files meanwhile.
    const raced = this.current.get(name);
    if (raced && raced.sha256 === files.sha256) return raced;
    this.evictToBudget(files.bytes);
    const slot = this.freeSlots.pop() ?? this.nextSlot++;
    try {
      this.backend.install(slot, files.weights);
    } catch (e) {
      this.freeSlots.push(slot);
      throw e;
    }
    if (raced) this.retire(raced); // only now: a failed install keeps the old copy serving
    const entry: AdapterEntry = {
      name,
      sha256: files.sha256,
      slot,
      bytes: files.bytes,
      meta: files.meta,
      loadMs: this.now() - started,
      refs: 0,
      lastUsed: this.now(),
      retired: false,
      fresh: true,
    };
    this.resident.add(entry);
    this.current.set(name, entry);
    this.bytes += entry.bytes;
    this.loads++;
    return entry;
  }

  private retire(entry: AdapterEntry): void {
    if (this.current.get(entry.name) === entry) this.current.delete(entry.name);
    entry.retired = true;
    if (entry.refs === 0) this.drop(entry);
  }

  private drop(entry: AdapterEntry): void {
    if (!this.resident.delete(entry)) return;
    this.backend.remove(entry.slot);
    this.freeSlots.push(entry.slot);
    this.bytes -= entry.bytes;
    if (this.current.get(entry.name) === entry) this.current.delete(entry.name);
  }

  /** Evicts idle adapters, least recently used first, until `incoming` more bytes fit. */
  private evictToBudget(incoming: number): void {
    while (this.bytes + incoming > this.budgetBytes) {
      let victim: AdapterEntry | undefined;
      for (const e of this.resident) {
        if (e.refs === 0 && !e.fresh && (!victim || e.lastUsed < victim.lastUsed)) victim = e;
      }
      if (!victim) return; // everything busy or just installed: over budget until that changes
      this.retire(victim);
      this.evictions++;
      this.onEvent({ kind: "evicted", entry: victim });
    }
  }
}
