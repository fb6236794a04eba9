/**
 * Stop strings over a stream of text deltas.
 *
 * A stop string may arrive split over several deltas (and several tokens), so the matcher
 * holds back the longest tail of the text that could still become the start of a stop
 * string, and releases it once it can no longer match. When a stop string appears, the text
 * before it is released and the stream ends: the stop string itself is not part of the output
 * (OpenAI semantics).
 */
import { InvalidArgument } from "@qlora/core";

export interface StopPush {
  /** Text that is now safe to emit. */
  text: string;
  /** A stop string was found; nothing more should be emitted. */
  stopped: boolean;
  /** Which stop string ended the stream. */
  stop?: string;
}

export class StopMatcher {
  private readonly stops: string[];
  private readonly maxLen: number;
  private pending = "";
  private done = false;

  constructor(stops: readonly string[] = []) {
    for (const s of stops) {
      if (typeof s !== "string" || s.length === 0) throw new InvalidArgument("stop strings must be non-empty strings");
    }
    this.stops = [...new Set(stops)];
    this.maxLen = this.stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  get active(): boolean {
    return this.stops.length > 0;
  }

  push(delta: string): StopPush {
    if (this.done) return { text: "", stopped: true };
    if (this.stops.length === 0) return { text: delta, stopped: false };
    const buf = this.pending + delta;
    // Earliest occurrence of any stop string; ties (same start) go to the longest.
    let at = -1;
    let which = "";
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (at < 0 || i < at || (i === at && s.length > which.length))) {
        at = i;
        which = s;
      }
    }
    if (at >= 0) {
      this.done = true;
      this.pending = "";
      return { text: buf.slice(0, at), stopped: true, stop: which };
    }
    // Hold back the longest suffix that is a proper prefix of some stop string.
    let hold = 0;
    for (let k = Math.min(this.maxLen - 1, buf.length); k > 0; k--) {
      const tail = buf.slice(buf.length - k);
      if (this.stops.some((s) => s.startsWith(tail))) {
        hold = k;
        break;
      }
    }
    this.pending = buf.slice(buf.length - hold);
    return { text: buf.slice(0, buf.length - hold), stopped: false };
  }

  /** End of stream without a stop: release what was held back. */
  flush(): string {
    const t = this.done ? "" : this.pending;
    this.pending = "";
    return t;
  }
}
