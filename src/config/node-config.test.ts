import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadAgentConfig, loadServerConfig } from './node-config.js';
import { ConfigError } from '../errors.js';

async function withFile(text: string, fn: (file: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-cfg-'));
  try {
    const file = join(dir, 'c.yaml');
    await writeFile(file, text);
    await fn(file);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('an agent config with defaults', async () => {
  await withFile('registry: zk://10.0.0.5:2181/knit\nserver: https://cp:7700/\nnode: vm-1\n', async (file) => {
    const c = await loadAgentConfig(file);
    assert.equal(c.server, 'https://cp:7700');
    assert.equal(c.servicesDir, '/etc/knit/services.d');
    assert.equal(c.adminHost, '127.0.0.1');
    assert.equal(c.adminPort, 7701);
    assert.equal(c.inboundPortBase, 21000);
    assert.equal(c.drainMs, 10_000);
    assert.equal(c.allowRemoteUpstreams, false);
    assert.equal(c.adminTokenFile, undefined);
  });
  await withFile('registry: zk://10.0.0.5:2181/knit\nserver: https://cp:7700/\nadmin: 10.0.0.1:7701\nadmin_allow_remote: true\nadmin_token_file: /etc/knit/admin.token\n', async (file) => {
    const c = await loadAgentConfig(file);
    assert.deepEqual([c.adminHost, c.adminTokenFile], ['10.0.0.1', '/etc/knit/admin.token']);
  });
});

const badAgent: Array<[string, string, number | undefined, RegExp]> = [
  ['missing server', 'registry: zk://h:2181/knit\n', undefined, /missing required field "server"/],
  ['http server', 'registry: zk://h:2181/knit\nserver: http://cp:7700\n', 2, /server: must match pattern/],
  ['unknown field', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nregistery: x\n', 3, /registery: unknown field "registery"/],
  ['bad registry URL', 'registry: etcd://h:1\nserver: https://cp:7700\n', 1, /registry: registry URL "etcd:\/\/h:1": expected/],
  ['embedded registry on an agent', 'registry: "embedded:"\nserver: https://cp:7700\n', 1, /an agent needs a shared registry/],
  ['bad drain', 'registry: zk://h:2181/knit\nserver: https://cp:7700\ndrain: soon\n', 3, /drain: "soon" is not a duration/],
  ['bad node name', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nnode: "vm 1"\n', 3, /node: node name "vm 1" may only contain/],
  ['admin API on a public address', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nadmin: 0.0.0.0:7701\n', 3, /admin: 0\.0\.0\.0 is not a loopback address: the admin API .* would be open to the network/],
  ['remote admin without a token', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nadmin: 10.0.0.1:7701\nadmin_allow_remote: true\n', 4, /admin_allow_remote: needs admin_token_file/],
];
for (const [what, text, line, re] of badAgent) {
  test(`agent config: ${what} is refused with file, line and field`, async () => {
    await withFile(text, async (file) => {
      await assert.rejects(loadAgentConfig(file), (e: unknown) => {
        assert.ok(e instanceof ConfigError, String(e));
        assert.match(e.message, re);
        assert.ok(e.message.startsWith(file), e.message);
        if (line !== undefined) assert.ok(e.problems.some((p) => p.line === line), JSON.stringify(e.problems));
        return true;
      });
    });
  });
}

test('server config: defaults, and bad TTLs or trust domains are refused', async () => {
  await withFile('registry: "embedded:"\n', async (file) => {
    const c = await loadServerConfig(file);
    assert.equal(c.defaultIntention, 'deny');
    assert.equal(c.listenPort, 7700);
    assert.equal(c.leafTtlMs, 24 * 3600_000);
  });
  await withFile('registry: "embedded:"\nleaf_ttl: 5s\ntrust_domain: Bad.Domain\n', async (file) => {
    await assert.rejects(loadServerConfig(file), (e: unknown) => e instanceof ConfigError && /leaf_ttl: must be at least 10000 ms/.test(e.message) && /trust_domain: .*lowercase/.test(e.message));
  });
  await assert.rejects(loadServerConfig('/nonexistent/server.yaml'), /\/nonexistent\/server\.yaml: cannot read/);
});
