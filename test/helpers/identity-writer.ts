/**
 * A separate process that writes a stored identity (writeStored) and can be
 * stopped between two steps of the write: identity-store.test.ts SIGKILLs
 * it there, to prove that a crash at any step leaves the old identity or
 * the new one, whole.
 *
 * argv: dir material-json-file pause-after-step
 * Prints `step <n> <name>` after each step; after step number
 * `pause-after-step` (1-based; 0: never) it waits to be killed; prints
 * `done` when the write completed.
 */
import { readFile } from 'node:fs/promises';
import { writeStored } from '../../src/agent/identity-store.js';
import type { ServiceTls } from '../../src/identity/tls.js';

const [dir, file, pauseAt] = process.argv.slice(2);
const material = JSON.parse(await readFile(file!, 'utf8')) as ServiceTls;
let n = 0;
await writeStored(dir!, material, {
  afterStep: async (step) => {
    n++;
    process.stdout.write(`step ${n} ${step}\n`);
    if (n === Number(pauseAt)) {
      // Paused for good: the test kills this process here.
      setInterval(() => undefined, 1 << 30);
      await new Promise<never>(() => undefined);
    }
  },
});
process.stdout.write('done\n');
