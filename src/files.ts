/**
 * Files knit writes that must survive a crash at any instant: the registry
 * KV of the embedded backend, the CA's key and certificate, secrets made on
 * first start. A shared utility, below every layer.
 */
import { mkdir, open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Writes `data` to `path` so that a crash leaves the old or the new content, never a torn file. */
export async function writeFileAtomic(path: string, data: string, mode = 0o600): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

