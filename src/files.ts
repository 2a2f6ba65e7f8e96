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
  await writeSynced(tmp, data, mode, 'w');
  await rename(tmp, path);
  await fsyncPath(dirname(path));
}

/** Writes `data` to `path` and fsyncs it before closing (`wx`, the default: the file must be new). */
export async function writeSynced(path: string, data: string, mode: number, flags: 'w' | 'wx' = 'wx'): Promise<void> {
  const fh = await open(path, flags, mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsyncs a file or a directory (a directory: so that a rename or a new entry in it survives a crash). */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
