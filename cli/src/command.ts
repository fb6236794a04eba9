/**
 * What a `qlora` command is, and the argument handling they all share.
 *
 * A command is one file in src/commands/ exporting a `Command` (use defineCommand for type
 * checking), registered by one `export … from` line in src/commands/index.ts. Parsing is node:util
 * parseArgs in strict mode; `--help` and `--json` are added to every command.
 *
 * Every command module is loaded for `qlora --help`, so a command should import packages that load
 * the native kernels (@qlora/model, @qlora/quantizer, …) inside run(), with `await import(…)`.
 */
import { parseArgs } from "node:util";
import { QloraError } from "@qlora/core";

export interface OptionSpec {
  type: "string" | "boolean";
  short?: string;
  /** May be given several times (values are collected; lists also accept commas). */
  multiple?: boolean;
  /** Placeholder shown in help, e.g. "DIR". */
  value?: string;
  /** Shown in help as "(default: …)"; applied by the command (so "not given" stays visible). */
  default?: string;
  description: string;
}

export interface Io {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
  /** Whether stderr is an interactive terminal (progress bars go there). */
  isTTY: boolean;
  /** Terminal width for progress bars. */
  columns: number;
  env: NodeJS.ProcessEnv;
  cwd: string;
}

export interface CommandContext {
  args: Args;
  positionals: string[];
  /** --json: machine-readable output, one JSON object per line on stdout. */
  json: boolean;
  io: Io;
  /** Aborted on SIGINT/SIGTERM; long commands stop, clean up and return. */
  signal: AbortSignal;
}

export interface Command {
  name: string;
  /** One line for `qlora --help`. */
  summary: string;
  /** e.g. "qlora quantize --model DIR --out DIR [options]" */
  usage: string;
  /** Longer text for `qlora <name> --help`. */
  description?: string;
  options: Record<string, OptionSpec>;
  /** Accepts positional arguments (default: none allowed). */
  positionals?: { value: string; description: string };
  /** Returns the exit code (default 0). Throw UsageError / QloraError for expected failures. */
  run(ctx: CommandContext): Promise<number | void>;
}

export function defineCommand(c: Command): Command {
  return c;
}

/** A mistake in how the command was called: exit code 2 and a pointer to --help. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** Options every command has. */
export const COMMON_OPTIONS: Record<string, OptionSpec> = {
  help: { type: "boolean", short: "h", description: "Show this help" },
  json: { type: "boolean", description: "Machine-readable output: JSON objects, one per line, on stdout" },
};

type Parsed = Record<string, string | boolean | (string | boolean)[] | undefined>;

/** Typed access to parsed options, with errors phrased for the command line. */
export class Args {
  constructor(private readonly values: Parsed) {}

  has(name: string): boolean {
    return this.values[name] !== undefined;
  }

  string(name: string): string | undefined {
    const v = this.values[name];
    if (Array.isArray(v)) return v.at(-1) as string | undefined;
    return typeof v === "string" ? v : undefined;
  }

  requiredString(name: string): string {
    const v = this.string(name);
    if (v === undefined || v === "") throw new UsageError(`--${name} is required`);
    return v;
  }

  bool(name: string): boolean {
    return this.values[name] === true;
  }

  /** An integer option; `undefined` when not given. */
  int(name: string, range: { min?: number; max?: number } = {}): number | undefined {
    const raw = this.string(name);
    if (raw === undefined) return undefined;
    if (!/^-?\d+$/.test(raw.trim())) throw new UsageError(`--${name} must be an integer, got "${raw}"`);
    const n = Number(raw);
    if (!Number.isSafeInteger(n)) throw new UsageError(`--${name} is out of range: ${raw}`);
    if (range.min !== undefined && n < range.min) throw new UsageError(`--${name} must be at least ${range.min}, got ${n}`);
    if (range.max !== undefined && n > range.max) throw new UsageError(`--${name} must be at most ${range.max}, got ${n}`);
    return n;
  }

  /** One of `choices`; `undefined` when not given. */
  choice<T extends string>(name: string, choices: readonly T[]): T | undefined {
    const raw = this.string(name);
    if (raw === undefined) return undefined;
    if (!(choices as readonly string[]).includes(raw)) {
      throw new UsageError(`--${name} must be one of ${choices.join(", ")}; got "${raw}"`);
    }
    return raw as T;
  }

  /** Comma-separated and/or repeated values, trimmed, empties dropped. */
  list(name: string): string[] {
    const v = this.values[name];
    const raw = Array.isArray(v) ? v : v === undefined ? [] : [v];
    return raw
      .flatMap((x) => String(x).split(","))
      .map((s) => s.trim())
      .filter((s) => s.length > 0);
  }
}

export interface ParsedCommandLine {
  args: Args;
  positionals: string[];
  help: boolean;
  json: boolean;
}

/** Parses argv for one command; malformed input → UsageError. */
export function parseCommandLine(cmd: Command, argv: string[]): ParsedCommandLine {
  const options = { ...cmd.options, ...COMMON_OPTIONS };
  const spec: Record<string, { type: "string" | "boolean"; short?: string; multiple?: boolean }> = {};
  for (const [name, o] of Object.entries(options)) {
    spec[name] = { type: o.type, ...(o.short ? { short: o.short } : {}), ...(o.multiple ? { multiple: true } : {}) };
  }
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: spec, strict: true, allowPositionals: true });
  } catch (e) {
    // parseArgs' messages are clear but mention internals ("To specify a positional argument…");
    // keep the first sentence.
    const msg = e instanceof Error ? e.message.split(/\.\s/)[0]!.replace(/\.$/, "") : String(e);
    throw new UsageError(msg);
  }
  const values = parsed.values as Parsed;
  if (values.help === true) return { args: new Args(values), positionals: [], help: true, json: false };
  if (parsed.positionals.length && !cmd.positionals) {
    throw new UsageError(`unexpected argument "${parsed.positionals[0]}"`);
  }
  return { args: new Args(values), positionals: parsed.positionals, help: false, json: values.json === true };
}

export function commandHelp(cmd: Command): string {
  const options = { ...cmd.options, ...COMMON_OPTIONS };
  const rows = Object.entries(options).map(([name, o]) => {
    const flag = `${o.short ? `-${o.short}, ` : "    "}--${name}${o.type === "string" ? ` ${o.value ?? "VALUE"}` : ""}`;
    const extra = o.default !== undefined ? ` (default: ${o.default})` : "";
    return [flag, o.description + extra] as const;
  });
  const width = Math.min(34, Math.max(...rows.map(([f]) => f.length)) + 2);
  const lines = [`Usage: ${cmd.usage}`, "", cmd.description ?? cmd.summary, ""];
  if (cmd.positionals) lines.push("Arguments:", `  ${cmd.positionals.value.padEnd(width)}${cmd.positionals.description}`, "");
  lines.push("Options:");
  for (const [flag, desc] of rows) {
    lines.push(flag.length >= width ? `  ${flag}\n  ${" ".repeat(width)}${desc}` : `  ${flag.padEnd(width)}${desc}`);
  }
  return lines.join("\n") + "\n";
}

/** Exit code for an error: 2 for how the command was called, 1 for everything else. */
export function exitCodeFor(e: unknown): number {
  if (e instanceof UsageError) return 2;
  if (e instanceof QloraError && e.code === "INVALID_ARGUMENT") return 2;
  return 1;
}
