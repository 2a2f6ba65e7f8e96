/**
 * A separate process that registers one instance in ZooKeeper and then
 * waits to be killed: the contract suite SIGKILLs it to prove that a
 * crashed owner's instances vanish with its session.
 * argv: servers root sessionTimeoutMs instance-json
 */
import { ZooKeeperRegistry } from '../../src/registry/zookeeper/zookeeper.js';
import { silentLogger } from '../../src/log/logger.js';
import type { Instance } from '../../src/registry/registry.js';

const [servers, root, session, json] = process.argv.slice(2);
const r = await ZooKeeperRegistry.connect({ servers: servers!, root: root!, sessionTimeoutMs: Number(session), log: silentLogger() });
await r.register(JSON.parse(json!) as Instance);
process.stdout.write('registered\n');
setInterval(() => undefined, 1 << 30);
