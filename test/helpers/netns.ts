/**
 * Test hosts as network namespaces on one bridge: each host gets a veth
 * pair into the bridge and its own address; the root namespace holds the
 * bridge address (for ZooKeeper and the control plane). Everything is
 * removed by cleanup(). Needs root and iproute2.
 */
import { execFileSync, spawn, execFile, type ChildProcess } from 'node:child_process';

export interface NetHost {
  name: string;
  ns: string;
  address: string;
  /** The host's end of its veth pair. */
  device: string;
}

export interface TestNet {
  bridgeAddress: string;
  hosts: Record<string, NetHost>;
  /** Runs a command inside a host's namespace, in the background. */
  spawn(host: string, args: string[], env?: NodeJS.ProcessEnv): ChildProcess;
  /** Cuts a host off the network (down) or puts it back (up). */
  link(host: string, up: boolean): void;
  /** Runs a command inside a host's namespace to completion. */
  run(host: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }>;
  cleanup(): void;
}

const ip = (...args: string[]): string => execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

/** Why namespaces cannot be made here, or undefined when they can. */
export function netnsUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'network namespaces need root';
  try {
    ip('-V');
  } catch {
    return 'iproute2 (ip) is not installed';
  }
  return undefined;
}

/**
 * Removes what a test run that died without cleaning up left on `subnet`:
 * its bridge (which would black-hole this run's traffic, two bridges
 * claiming one address) and its namespaces. Only debris of processes that
 * are gone is touched; a live run's network is left alone.
 */
function removeDebris(subnet: number): void {
  let links: string;
  try {
    links = ip('-br', 'addr');
  } catch {
    return;
  }
  for (const line of links.split('\n')) {
    const m = /^knbr([0-9a-z]+)\s.*\s10\.231\.(\d+)\.1\//.exec(line);
    if (!m || Number(m[2]) !== subnet) continue;
    const pid = parseInt(m[1]!, 36);
    let alive = true;
    try {
      process.kill(pid, 0);
    } catch {
      alive = false;
    }
    if (alive && pid !== process.pid % 100000) continue;
    for (const ns of ip('netns', 'list').split('\n').map((l) => l.split(' ')[0]!).filter((n) => n.startsWith(`knit-${m[1]}-`))) {
      try {
        ip('netns', 'del', ns);
      } catch {
        // already gone
      }
    }
    try {
      ip('link', 'del', `knbr${m[1]}`);
    } catch {
      // already gone
    }
  }
}

/** Makes `names` hosts on 10.231.<subnet>.0/24: bridge .1, hosts .11, .12, ... */
export function makeNet(names: string[], subnet = 77): TestNet {
  removeDebris(subnet);
  const tag = (process.pid % 100000).toString(36);
  const bridge = `knbr${tag}`;
  const prefix = `10.231.${subnet}`;
  const hosts: Record<string, NetHost> = {};
  const made: string[] = [];
  const cleanup = (): void => {
    for (const ns of made) {
      try {
        ip('netns', 'del', ns);
      } catch {
        // already gone
      }
    }
    try {
      ip('link', 'del', bridge);
    } catch {
      // already gone
    }
  };
  try {
    ip('link', 'add', bridge, 'type', 'bridge');
    ip('addr', 'add', `${prefix}.1/24`, 'dev', bridge);
    ip('link', 'set', bridge, 'up');
    names.forEach((name, i) => {
      const ns = `knit-${tag}-${name}`;
      const address = `${prefix}.${11 + i}`;
      ip('netns', 'add', ns);
      made.push(ns);
      const outer = `kv${tag}${i}o`;
      const inner = `kv${tag}${i}i`;
      ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner);
      ip('link', 'set', inner, 'netns', ns);
      ip('link', 'set', outer, 'master', bridge);
      ip('link', 'set', outer, 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');
      ip('-n', ns, 'addr', 'add', `${address}/24`, 'dev', inner);
      ip('-n', ns, 'link', 'set', inner, 'up');
      hosts[name] = { name, ns, address, device: inner };
    });
  } catch (e) {
    cleanup();
    throw e;
  }
  return {
    bridgeAddress: `${prefix}.1`,
    hosts,
    link(host, up) {
      ip('-n', hosts[host]!.ns, 'link', 'set', hosts[host]!.device, up ? 'up' : 'down');
    },
    spawn(host, args, env = {}) {
      return spawn('ip', ['netns', 'exec', hosts[host]!.ns, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    },
    run(host, args) {
      return new Promise((resolve) => {
        execFile('ip', ['netns', 'exec', hosts[host]!.ns, ...args], { timeout: 60_000 }, (err, stdout, stderr) => {
          resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
        });
      });
    },
    cleanup,
  };
}
