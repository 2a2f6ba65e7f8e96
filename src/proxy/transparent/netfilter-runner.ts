/**
 * Running nft, iptables and friends: the one place that starts processes
 * for the netfilter backends, injected into them as a `CommandRunner` so
 * that tests can run everything inside a network namespace (or record the
 * commands) and the agent can run them on its host. `runChecked` turns a
 * failed command into a one-line NetfilterError that says what to do.
 */
import { spawn } from 'node:child_process';
import { NetfilterError } from './netfilter-spec.js';

/** What a command did. `code` 127: the program is not installed (also inside a namespace). */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `argv` with `input` on its stdin (none when undefined). Resolves on any exit status. */
export type CommandRunner = (argv: readonly string[], input?: string) => Promise<RunResult>;

/** Where and how long commands run. */
export interface ProcessRunnerOptions {
  /** Run inside `ip netns exec NAME`. */
  netns?: string;
  /** Kill a command that has not finished after this long (ms). Default 30 s: iptables may wait for its lock. */
  timeoutMs?: number;
}

/** The exit status the shell uses for "command not found", which `ip netns exec` does not. */
export const NOT_FOUND = 127;

/**
 * Runs commands as processes on this host, or inside a network namespace.
 * Rejects with a NetfilterError only when the namespace or `ip` is
 * missing (nothing could run at all) or the command times out.
 */
export function processRunner(opts: ProcessRunnerOptions = {}): CommandRunner {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  return (argv, input) => {
    const full = opts.netns === undefined ? [...argv] : ['ip', 'netns', 'exec', opts.netns, ...argv];
    return new Promise((resolve, reject) => {
      const child = spawn(full[0]!, full.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        if (e.code !== 'ENOENT') return reject(new NetfilterError('rejected', `${argv.join(' ')}: ${e.message}`, { cause: e, command: argv.join(' ') }));
        if (opts.netns !== undefined) return reject(new NetfilterError('missing-tool', 'ip (iproute2) is not installed, and --netns needs it: apt-get install iproute2', { cause: e, command: 'ip' }));
        resolve({ code: NOT_FOUND, stdout: '', stderr: `${argv[0]}: command not found` });
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (signal === 'SIGKILL') return reject(new NetfilterError('timeout', `${argv.join(' ')} did not finish in ${timeoutMs} ms (is another process holding the xtables lock?)`, { command: argv.join(' ') }));
        if (opts.netns !== undefined && /^Cannot open network namespace/m.test(stderr)) {
          return reject(new NetfilterError('netns', `network namespace ${JSON.stringify(opts.netns)} does not exist (ip netns list shows those that do)`, { command: full.join(' ') }));
        }
        // ip netns exec reports a missing program itself, with its own exit status.
        if (opts.netns !== undefined && /^exec of "[^"]*" failed: No such file or directory/m.test(stderr)) return resolve({ code: NOT_FOUND, stdout, stderr: `${argv[0]}: command not found` });
        resolve({ code: code ?? 1, stdout, stderr });
      });
      // A command that exits without reading its input closes the pipe: that is its exit status's business, not an error here.
      child.stdin.on('error', () => undefined);
      child.stdin.end(input ?? '');
    });
  };
}

/** The Debian package that provides each program knit runs. */
const PACKAGES: Record<string, string> = { nft: 'nftables', ip: 'iproute2' };

/** The first line of a tool's error output that says something (nft prints the script line and carets after it). */
export function firstErrorLine(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#') && !/^\^+$/.test(l));
  const line = lines.find((l) => /error|fail|denied|not permitted|can't|cannot|unknown|invalid|bad /i.test(l)) ?? lines[0] ?? '(no error output)';
  return line.replace(/^\/dev\/stdin:[\d:-]+:\s*/, '');
}

/** Whether a tool's output says it lacks the privilege (no CAP_NET_ADMIN). */
export const isPermissionError = (stderr: string): boolean => /Operation not permitted|Permission denied|you must be root/i.test(stderr);

/** Whether a tool's output says the kernel cannot do it (module missing, family off). */
export const isUnsupported = (stderr: string): boolean =>
  /Protocol not supported|Address family not supported|Table does not exist|do you need to insmod|Could not fetch rule set generation id: Invalid argument/i.test(stderr);

/** A failed command as a one-line NetfilterError naming the command and what to do about it. */
export function commandFailure(argv: readonly string[], r: RunResult): NetfilterError {
  const cmd = argv.join(' ');
  const prog = argv[0]!;
  if (r.code === NOT_FOUND) return new NetfilterError('missing-tool', `${prog} is not installed: apt-get install ${PACKAGES[prog] ?? 'iptables'}`, { command: cmd });
  if (isPermissionError(r.stderr)) return new NetfilterError('permission', `${cmd}: needs CAP_NET_ADMIN: run as root (or grant the capability)`, { command: cmd });
  if (isUnsupported(r.stderr)) return new NetfilterError('unsupported', `${cmd}: the kernel cannot do it: ${firstErrorLine(r.stderr)}`, { command: cmd });
  return new NetfilterError('rejected', `${cmd} failed: ${firstErrorLine(r.stderr)}`, { command: cmd });
}

/** Runs a command and returns its stdout; a failure rejects with `commandFailure`. */
export async function runChecked(run: CommandRunner, argv: readonly string[], input?: string): Promise<string> {
  const r = await run(argv, input);
  if (r.code !== 0) throw commandFailure(argv, r);
  return r.stdout;
}
