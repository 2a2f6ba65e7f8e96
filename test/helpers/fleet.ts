/**
 * Running real `knit agent` processes on the hosts of a TestNet (network
 * namespaces) for the fleet end-to-end tests: start one and wait for it to
 * be ready (or to fail, with its output), read its loopback admin API from
 * inside its namespace, and write its agent.yaml.
 */
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { KNIT } from './knit.js';
import type { TestNet } from './netns.js';
import { until } from './wait.js';

/** One agent process and everything it printed (across restarts). */
export interface AgentProc {
  proc?: ChildProcess;
  out: string;
}

export interface AgentYaml {
  node: string;
  registry: string;
  server: string;
  advertise: string;
  /** Extra YAML lines. */
  extra?: string[];
}

export class FleetAgents {
  readonly agents: Record<string, AgentProc> = {};

  constructor(private readonly net: TestNet, private readonly dir: string) {}

  /** The host's directory: agent.yaml, join.token, services/, data/. */
  home(host: string): string {
    return join(this.dir, host);
  }

  /** Writes the host's agent.yaml (and makes its services dir). */
  async configure(host: string, c: AgentYaml): Promise<string> {
    const h = this.home(host);
    await mkdir(join(h, 'services'), { recursive: true });
    const file = join(h, 'agent.yaml');
    const lines = [
      `node: ${c.node}`,
      `data_dir: ${join(h, 'data')}`,
      `registry: ${c.registry}`,
      `server: ${c.server}`,
      `join_token_file: ${join(h, 'join.token')}`,
      `services_dir: ${join(h, 'services')}`,
      `advertise: ${c.advertise}`,
      ...(c.extra ?? []),
    ];
    await writeFile(file, lines.join('\n') + '\n');
    return file;
  }

  /** Starts the host's agent; resolves with where its output for this run begins. */
  spawn(host: string): number {
    const a = (this.agents[host] ??= { out: '' });
    const p = this.net.spawn(host, [process.execPath, KNIT, 'agent', '--config', join(this.home(host), 'agent.yaml')], { KNIT_LOG_LEVEL: 'info' });
    a.proc = p;
    const mark = a.out.length;
    p.stdout!.on('data', (d: Buffer) => (a.out += d.toString()));
    p.stderr!.on('data', (d: Buffer) => (a.out += d.toString()));
    return mark;
  }

  /** Starts (or restarts) the host's agent and waits until it is ready; throws with its output if it exits. */
  async start(host: string, timeoutMs = 60_000): Promise<string> {
    const mark = this.spawn(host);
    const a = this.agents[host]!;
    try {
      await until(`agent ${host} ready`, () => {
        if (a.proc!.exitCode !== null) throw new Error(`agent ${host} exited ${a.proc!.exitCode}: ${a.out.slice(mark).slice(-3000)}`);
        return a.out.slice(mark).includes('knit agent ready');
      }, timeoutMs, 50);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- agent ${host} output:\n${a.out.slice(mark).slice(-3000)}`);
    }
    return a.out.slice(mark);
  }

  /** Starts the host's agent expecting it to fail; resolves with its exit code and output. */
  async startFailing(host: string, timeoutMs = 60_000): Promise<{ code: number | null; out: string }> {
    const mark = this.spawn(host);
    const a = this.agents[host]!;
    if (a.proc!.exitCode === null) await Promise.race([once(a.proc!, 'exit'), new Promise((r) => setTimeout(r, timeoutMs).unref())]);
    if (a.proc!.exitCode === null) throw new Error(`agent ${host} did not exit: ${a.out.slice(mark).slice(-3000)}`);
    return { code: a.proc!.exitCode, out: a.out.slice(mark) };
  }

  /** Output of the host's agent since `mark`. */
  output(host: string, mark = 0): string {
    return this.agents[host]?.out.slice(mark) ?? '';
  }

  /** Stops the host's agent (SIGTERM, or the given signal) and waits for it to exit. */
  async stop(host: string, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    const p = this.agents[host]?.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return p?.exitCode ?? null;
    const exited = once(p, 'exit');
    p.kill(signal);
    await exited;
    return p.exitCode;
  }

  killAll(): void {
    for (const a of Object.values(this.agents)) a.proc?.kill('SIGKILL');
  }

  /** GETs a path of the host's admin API from inside its namespace (it listens on loopback). */
  async admin(host: string, path: string, port = 7701): Promise<string> {
    const r = await this.net.run(host, [process.execPath, '-e', `fetch('http://127.0.0.1:${port}${path}').then(r=>r.text()).then(t=>process.stdout.write(t))`]);
    return r.stdout;
  }

  /** The host agent's /v1/state. */
  async state(host: string): Promise<{ services: Array<{ name: string; waiting?: string; certificateExpires?: string; upstreams: Array<{ endpoints: string[] }> }> }> {
    return JSON.parse(await this.admin(host, '/v1/state')) as never;
  }

  async metrics(host: string): Promise<string> {
    return this.admin(host, '/metrics');
  }
}
