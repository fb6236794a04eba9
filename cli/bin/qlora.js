#!/usr/bin/env node
// The `qlora` executable: the compiled CLI (npm run build:ts produces cli/dist).
import "../dist/src/main.js";
