/**
 * `qlora` dispatch: finds the command, parses its arguments, runs it, and turns failures into
 * one line on stderr and an exit code (2: usage or invalid argument, 1: anything else). Expected
 * errors (UsageError, QloraError) never show a stack trace; unexpected ones do only with
 * QLORA_DEBUG=1.
 */
import { readFileSync } from "node:fs";
import { isQloraError } from "@qlora/core";
import { commandHelp, exitCodeFor, parseCommandLine, UsageError, type Command, type Io } from "./command.js";
import * as registered from "./commands/index.js";

export const commands: readonly Command[] = Object.values(registered as Record<string, Command>).sort((a, b) =>
  a.name.localeCompare(b.name),
);

export function findCommand(name: string): Command | undefined {
  return commands.find((c) => c.name === name);
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string };
  return pkg.version;
}

export function mainHelp(): string {
  const width = Math.max(...commands.map((c) => c.name.length)) + 3;
  return [
    "Usage: qlora <command> [options]",
    "",
    "QLoRA on CPU: quantize Hugging Face checkpoints to NF4, train LoRA adapters, serve them over gRPC.",
    "",
    "Commands:",
    ...commands.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    "",
    "Options:",
    "  -h, --help     Show this help (also: qlora <command> --help)",
    "  -V, --version  Print the version",
    "",
    "Every command accepts --json for machine-readable output.",
    "",
  ].join("\n");
}

export function defaultIo(): Io {
  return {
    stdout: process.stdout,
    stderr: process.stderr,
    isTTY: process.stderr.isTTY === true,
    columns: process.stderr.columns || 80,
    env: process.env,
    cwd: process.cwd(),
  };
}

/** Runs one command line; returns the exit code. Never throws. */
export async function runCli(argv: string[], io: Io = defaultIo(), signal: AbortSignal = new AbortController().signal): Promise<number> {
  const [first, ...rest] = argv;
  if (first === undefined || first === "-h" || first === "--help" || first === "help") {
    const topic = first === "help" ? rest[0] : undefined;
    const cmd = topic ? findCommand(topic) : undefined;
    if (topic && !cmd) return usageFailure(io, `unknown command "${topic}"`, undefined, false);
    if (first === undefined) {
      // No command at all: a usage error, so the help goes to stderr.
      io.stderr.write(mainHelp());
      return 2;
    }
    io.stdout.write(cmd ? commandHelp(cmd) : mainHelp());
    return 0;
  }
  if (first === "-V" || first === "--version") {
    io.stdout.write(`qlora ${version()}\n`);
    return 0;
  }
  const cmd = findCommand(first);
  if (!cmd) {
    const hint = first.startsWith("-") ? `unknown option "${first}"` : `unknown command "${first}"`;
    return usageFailure(io, hint, undefined, argv.includes("--json"));
  }

  let json = rest.includes("--json");
  try {
    const parsed = parseCommandLine(cmd, rest);
    if (parsed.help) {
      io.stdout.write(commandHelp(cmd));
      return 0;
    }
    json = parsed.json;
    const code = await cmd.run({ args: parsed.args, positionals: parsed.positionals, json, io, signal });
    return code ?? 0;
  } catch (e) {
    if (e instanceof UsageError) return usageFailure(io, e.message, cmd, json);
    return reportError(io, e, cmd, json);
  }
}

function usageFailure(io: Io, message: string, cmd: Command | undefined, json: boolean): number {
  if (json) {
    io.stderr.write(JSON.stringify({ error: { code: "USAGE", message } }) + "\n");
  } else {
    const prefix = cmd ? `qlora ${cmd.name}` : "qlora";
    io.stderr.write(`${prefix}: ${message} (see '${prefix} --help')\n`);
  }
  return 2;
}

/** One line for any error; the exit code from exitCodeFor. */
export function reportError(io: Io, e: unknown, cmd: Command | undefined, json: boolean): number {
  const prefix = cmd ? `qlora ${cmd.name}` : "qlora";
  const expected = isQloraError(e);
  const message = e instanceof Error ? e.message : String(e);
  if (json) {
    const code = expected ? e.code : "INTERNAL";
    io.stderr.write(JSON.stringify({ error: { code, message } }) + "\n");
  } else {
    const hint = expected || io.env.QLORA_DEBUG ? "" : " (unexpected error; set QLORA_DEBUG=1 for a stack trace)";
    io.stderr.write(`${prefix}: ${message}${hint}\n`);
  }
  if (!expected && io.env.QLORA_DEBUG) io.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
  return exitCodeFor(e);
}
