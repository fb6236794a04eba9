// The CLI as a library: other packages (and tests) can run commands in-process.
export { runCli, commands, findCommand, mainHelp, defaultIo, reportError } from "./cli.js";
export {
  Args,
  UsageError,
  defineCommand,
  parseCommandLine,
  commandHelp,
  exitCodeFor,
  COMMON_OPTIONS,
  type Command,
  type CommandContext,
  type OptionSpec,
  type Io,
} from "./command.js";
export { formatBytes, formatDuration, writeJsonLine, progressReporter, type ProgressReporter, type ProgressState } from "./output.js";
export { SERVICES, availableServices, type ServeContext, type ServiceFactory } from "./services.js";
