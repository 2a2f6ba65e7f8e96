/**
 * A real ZooKeeper for tests: Debian's `zookeeper` package (installed with
 * apt-get when missing and running as root), started standalone or as an
 * ensemble in a temp dir on free ports, stopped and removed afterwards.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import { until } from './wait.js';
import { freePort } from './knit.js';

const JARS = ['/usr/share/java/zookeeper.jar', '/usr/share/java/slf4j-simple.jar'];

/** Makes sure the zookeeper package is there; returns a reason when it cannot be. */
export function ensureZooKeeper(): string | undefined {
  if (JARS.every((j) => existsSync(j))) return undefined;
  if (process.getuid?.() !== 0) return 'ZooKeeper is not installed and installing it needs root: apt-get install zookeeper';
  try {
    execFileSync('apt-get', ['update', '-qq'], { stdio: 'ignore', timeout: 300_000 });
    execFileSync('apt-get', ['install', '-y', '-qq', 'zookeeper'], { stdio: 'ignore', timeout: 600_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  } catch (e) {
    return `apt-get install zookeeper failed: ${(e as Error).message}`;
  }
  return JARS.every((j) => existsSync(j)) ? undefined : 'zookeeper installed but its jars are missing';
}

/** Sends a four-letter command; resolves with the answer, or '' on any failure (socket timeout 1 s). */
export function fourLetter(host: string, port: number, cmd: string): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    let out = '';
    s.setTimeout(1000, () => s.destroy());
    s.on('connect', () => s.write(cmd));
    s.on('data', (d: Buffer) => (out += d.toString()));
    s.on('error', () => undefined);
    s.on('close', () => resolve(out));
  });
}

export interface ZkMember {
  id: number;
  host: string;
  clientPort: number;
  proc?: ChildProcess;
  /** `leader`, `follower`, `standalone`, or '' when not serving. */
  mode(): Promise<string>;
  stop(signal?: NodeJS.Signals): Promise<void>;
  start(): Promise<void>;
}

export interface ZkCluster {
  members: ZkMember[];
  /** `h1:p1,h2:p2,...` */
  connect: string;
  leader(): Promise<ZkMember | undefined>;
  stop(): Promise<void>;
}

/**
 * Starts `size` servers on `host` (1: standalone). Election ports are kept
 * below 32768 as ZooKeeper 3.8 here requires.
 */
export async function startZooKeeper(opts: { size?: number; host?: string; tickMs?: number } = {}): Promise<ZkCluster> {
  const why = ensureZooKeeper();
  if (why) throw new Error(why);
  const size = opts.size ?? 1;
  const host = opts.host ?? '127.0.0.1';
  const dir = await mkdtemp(join(tmpdir(), 'knit-zk-'));
  const base = 20000 + Math.floor(Math.random() * 12000);
  const ports = await Promise.all(Array.from({ length: size }, () => freePort()));
  const members: ZkMember[] = [];
  for (let i = 0; i < size; i++) {
    const id = i + 1;
    const mdir = join(dir, `zk${id}`);
    await mkdir(join(mdir, 'data'), { recursive: true });
    await writeFile(join(mdir, 'data', 'myid'), `${id}\n`);
    const lines = [
      `tickTime=${opts.tickMs ?? 200}`,
      'initLimit=10',
      'syncLimit=5',
      `dataDir=${join(mdir, 'data')}`,
      `clientPort=${ports[i]}`,
      `clientPortAddress=${host}`,
      // Low minimum so tests can use short sessions; a crashed owner's nodes go in about a second.
      'minSessionTimeout=400',
      'maxSessionTimeout=60000',
      'admin.enableServer=false',
      '4lw.commands.whitelist=ruok,srvr,mntr',
      ...(size > 1 ? Array.from({ length: size }, (_, j) => `server.${j + 1}=${host}:${base + 2 * j}:${base + 2 * j + 1}`) : []),
    ];
    await writeFile(join(mdir, 'zoo.cfg'), lines.join('\n') + '\n');
    const m: ZkMember = {
      id,
      host,
      clientPort: ports[i]!,
      async mode() {
        const out = await fourLetter(host, this.clientPort, 'srvr');
        return /Mode: (\w+)/.exec(out)?.[1] ?? '';
      },
      async start() {
        this.proc = spawn('java', ['-Xmx256m', '-cp', JARS.join(':'), 'org.apache.zookeeper.server.quorum.QuorumPeerMain', join(mdir, 'zoo.cfg')], { cwd: mdir, stdio: 'ignore' });
      },
      async stop(signal = 'SIGKILL') {
        const p = this.proc;
        if (!p || p.exitCode !== null || p.signalCode !== null) return;
        p.kill(signal);
        await new Promise((r) => p.once('exit', r));
      },
    };
    members.push(m);
  }
  for (const m of members) await m.start();
  await until('ZooKeeper serving', async () => (await Promise.all(members.map((m) => m.mode()))).every((x) => x !== ''), 60_000, 100);
  return {
    members,
    connect: members.map((m) => `${m.host}:${m.clientPort}`).join(','),
    async leader() {
      for (const m of members) if ((await m.mode()) === 'leader') return m;
      return undefined;
    },
    async stop() {
      for (const m of members) await m.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
