/**
 * Process entry of `qlora` (cli/bin/qlora.js imports this). Turns SIGINT/SIGTERM into an abort
 * signal so long commands (quantize, serve) stop cleanly; a second signal exits at once.
 */
import { runCli } from "./cli.js";

const ctrl = new AbortController();
let signals = 0;
const onSignal = (sig: NodeJS.Signals) => {
  signals++;
  if (signals > 1) process.exit(sig === "SIGINT" ? 130 : 143);
  ctrl.abort(Object.assign(new Error(`received ${sig}`), { name: "AbortError", signal: sig }));
};
process.on("SIGINT", onSignal);
process.on("SIGTERM", onSignal);

const code = await runCli(process.argv.slice(2), undefined, ctrl.signal);
process.exitCode = code;
// The command is done: a signal arriving while the process winds down just exits with its code.
process.off("SIGINT", onSignal);
process.off("SIGTERM", onSignal);
const exitNow = () => process.exit(code);
process.on("SIGINT", exitNow);
process.on("SIGTERM", exitNow);
