#!/usr/bin/env node
// The `knit` binary: registers the TypeScript loader, then hands over to the
// CLI. Shipping sources with tsx keeps one artefact for every platform.
import { register } from 'tsx/esm/api';
register();
await import('../src/cli/main.ts');
