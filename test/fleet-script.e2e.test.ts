/**
 * `npm run fleet`, as a user runs it: it starts ZooKeeper, a knit server,
 * two knit agents and the example apps on loopback, says it is ready, web
 * reaches api through both agents, and Ctrl-C leaves no process and no
 * temporary directory behind.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { ROOT } from './helpers/knit.js';
import { ensureZooKeeper } from './helpers/zookeeper.js';
import { until } from './helpers/wait.js';

const missing = ensureZooKeeper();

/** Every process now running, as pid -> [parent pid, command line]. */
function processes(): Map<number, [number, string]> {
  const out = new Map<number, [number, string]>();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      // The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const cmd = readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').join(' ').trim();
      out.set(Number(d), [ppid, cmd]);
    } catch {
      // gone while we looked
    }
  }
  return out;
}

/** `root` and every process below it, with their command lines. */
function tree(root: number): Map<number, string> {
  const all = processes();
  const found = new Map<number, string>();
  const walk = (pid: number): void => {
    for (const [child, [ppid, cmd]] of all) {
      if (ppid !== pid || found.has(child)) continue;
      found.set(child, cmd);
      walk(child);
    }
  };
  const self = all.get(root);
  if (self) found.set(root, self[1]);
  walk(root);
  return found;
}

test('npm run fleet: ready line, web -> api through two agents, and Ctrl-C leaves no process or temp dir', { skip: missing && `cannot run: ${missing}`, timeout: 240_000 }, async (t) => {
  // Its own process group, so that SIGINT to the group is what Ctrl-C in a terminal does.
  const npm = spawn('npm', ['run', 'fleet', '--', '--any-ports'], { cwd: ROOT, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  npm.stdout.on('data', (d: Buffer) => (out += d.toString()));
  npm.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => npm.once('exit', (code) => r(code)));
  t.after(() => {
    if (npm.exitCode === null && npm.signalCode === null) process.kill(-npm.pid!, 'SIGKILL');
  });

  await until('fleet ready', () => {
    if (npm.exitCode !== null) throw new Error(`npm run fleet exited ${npm.exitCode}:\n${out}`);
    return /^fleet ready$/m.test(out);
  }, 180_000, 100);
  const dir = /everything lives in (\/\S+) \(removed on Ctrl-C\)/.exec(out)?.[1];
  const web = /curl (http:\/\/127\.0\.0\.1:\d+\/)/.exec(out)?.[1];
  assert.ok(dir && web, out);
  assert.ok(existsSync(dir));

  const running = tree(npm.pid!);
  const cmds = [...running.values()];
  const java = cmds.filter((c) => c.startsWith('java ') && c.includes('QuorumPeerMain'));
  assert.equal(java.length, 1, cmds.join('\n'));
  assert.equal(cmds.filter((c) => c.includes(`knit.mjs server --config ${dir}/`)).length, 1, cmds.join('\n'));
  assert.equal(cmds.filter((c) => c.includes(`knit.mjs agent --config ${dir}/`)).length, 2, cmds.join('\n'));
  // ZooKeeper's own temp dir (the helper makes it): from its zoo.cfg path, .../knit-zk-XXXX/zk1/zoo.cfg.
  const zkDir = dirname(dirname(/\s(\/\S+\/zoo\.cfg)$/.exec(java[0]!)?.[1] ?? '/x/y/z'));
  assert.ok(existsSync(zkDir), zkDir);

  // The fleet works: web on agent web-1 calls api on agent api-1 through the mesh.
  const res = await fetch(web);
  assert.equal(res.status, 200);
  assert.match(await res.text(), /^web got from api: .*hello from api/);

  process.kill(-npm.pid!, 'SIGINT');
  await exited;
  assert.match(out, /fleet stopped; removed /, out);
  // Nothing of this run is left: no java, no knit, no app (same pid and command line), no temp dir.
  await until('every process of the run gone', () => {
    const now = processes();
    return [...running].every(([pid, cmd]) => now.get(pid)?.[1] !== cmd);
  }, 30_000, 100);
  assert.equal(existsSync(dir), false, `${dir} is still there`);
  assert.equal(existsSync(zkDir), false, `${zkDir} is still there`);
});
