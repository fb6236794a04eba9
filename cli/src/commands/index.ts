// The command registry: one line per command. Each file exports a Command (see ../command.ts).
export { quantize } from "./quantize.js";
export { serve } from "./serve.js";
export { evalCommand } from "./eval.js";
export { generate } from "./generate.js";
export { train } from "./train.js";
export { demo } from "./demo.js";
