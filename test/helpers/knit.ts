/** Running the real `knit` binary and the example apps as processes, for end-to-end tests. */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { join, dirname } from 'node:path';
import { until } from './wait.js';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const KNIT = join(ROOT, 'bin', 'knit.mjs');

/** A running process whose output is collected. */
export interface Proc {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Waits until stdout+stderr match. */
  waitFor(re: RegExp, timeoutMs?: number): Promise<void>;
  /** SIGTERM, then waits for exit. */
  stop(): Promise<number | null>;
  /** SIGKILL, then waits for exit. */
  kill(): Promise<void>;
}

export function start(args: string[], env: NodeJS.ProcessEnv = {}): Proc {
  const child = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const waitExit = async (): Promise<void> => {
    if (!exited()) await once(child, 'exit');
  };
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    async waitFor(re, timeoutMs = 20_000) {
      await until(`${re} in output of ${args.slice(0, 2).join(' ')}`, () => {
        if (re.test(out) || re.test(err)) return true;
        if (exited()) throw new Error(`process exited (${child.exitCode ?? child.signalCode}) before ${re}:\n${out}\n${err.slice(-2000)}`);
        return false;
      }, timeoutMs, 20);
    },
    async stop() {
      if (!exited()) child.kill('SIGTERM');
      await waitExit();
      return child.exitCode;
    },
    async kill() {
      if (!exited()) child.kill('SIGKILL');
      await waitExit();
    },
  };
}

/** Runs `knit ARGS` to completion. */
export function knit(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [KNIT, ...args], { cwd: ROOT, env: { ...process.env, ...env }, timeout: 60_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** A port that was free a moment ago (the small race is acceptable on a test machine). */
export async function freePort(): Promise<number> {
  const s = net.createServer();
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}
