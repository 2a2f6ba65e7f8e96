/**
 * The `knit` command line: parses flags, calls into app/ or the admin API,
 * prints. Every command has --help; failures exit non-zero with one line.
 *
 * `--admin`, `--server`, `--token-file`, `--ca-file`, `--json` and
 * `--log-format` are global: they work before or after the subcommand
 * (`knit --json services` and `knit services --json`).
 */
// Only what every command needs is imported here. Each command imports its
// implementation when it runs (`await import(...)` in its action), so that
// `knit agent` never loads the control plane, the dev composition or the
// validator, and `knit --help` loads none of them: every module loaded is
// memory a long-running agent keeps for its whole life, and start-up time
// for every short command. test/lazy-load.test.ts checks it.
import { Command, CommanderError, Option } from 'commander';
import { resolve } from 'node:path';
import type { Logger, LogFormat } from '../log/logger.js';
import { logLevel, devDataDir, logFormat, LOG_FORMATS } from '../config/env.js';
import { ConfigError, KnitError, formatProblem } from '../errors.js';
import type { ServiceSummary, Instance } from '../registry/registry.js';
import type { ServiceState } from '../agent/agent.js';
// CliError lives apart from client.js, so that commands that do not call an API
// (`--help`, `validate`) do not load its HTTP and identity code; `api` is reached
// through `api()` below.
import type { ApiOptions } from './client.js';
import { CliError, listenFailure, type PortOwner } from './failures.js';

/** The global options, as every action sees them (merged with its own by `optsWithGlobals`). */
interface GlobalOpts extends ApiOptions {
  json?: boolean;
  logFormat?: LogFormat;
}

const program = new Command();
program
  .name('knit')
  .description('A service mesh for mixed fleets of VMs, bare metal, containers and Kubernetes')
  .version('0.1.0')
  .addOption(new Option('--admin <url>', 'admin API of the local knit, host:port or URL (default $KNIT_ADMIN_ADDR or http://127.0.0.1:7701)'))
  .addOption(new Option('--server <url>', 'the control plane, e.g. https://cp:7700 (default $KNIT_SERVER; without it: the local admin API)'))
  .addOption(new Option('--token-file <file>', 'operator token for --server (default $KNIT_TOKEN_FILE or /var/lib/knit/operator.token)'))
  .addOption(new Option('--ca-file <file>', 'CA root for --server (default $KNIT_CA_FILE or /var/lib/knit/ca/root.pem)'))
  .addOption(new Option('--json', 'print JSON (where the output is data)'))
  .addOption(new Option('--log-format <format>', 'log lines: pretty (for people), json (one object per line) or auto: pretty on a terminal (default $KNIT_LOG_FORMAT or auto)').choices(LOG_FORMATS))
  .configureHelp({ showGlobalOptions: true });

/** The admin API / control-plane client (`./client.js`'s `api`), loaded on a client command's first call. */
async function api<T>(o: ApiOptions, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
  const client = await import('./client.js');
  return client.api<T>(o, method, path, body);
}

/** This command's options merged with the global ones. */
function opts<T>(cmd: Command): T & GlobalOpts {
  return cmd.optsWithGlobals<T & GlobalOpts>();
}

/**
 * The process's loggers, so that an exit waits until their lines are
 * written (logging is asynchronous). The CLI is the composition root: this
 * is the one place that knows the process is about to end.
 */
const loggers: Logger[] = [];

/** The process logger for a long-running command, in the format the user chose. */
async function processLogger(cmd: Command, level: string): Promise<Logger> {
  let format: LogFormat;
  try {
    format = opts<object>(cmd).logFormat ?? logFormat();
  } catch (e) {
    throw new CliError((e as Error).message);
  }
  const [{ createLogger }, { installProcessGuard }] = await Promise.all([import('../log/logger.js'), import('../log/process-guard.js')]);
  const log = createLogger({ level, format });
  loggers.push(log);
  // After too many uncaught exceptions the guard exits: with the lines that say why.
  installProcessGuard(log, { exit: (code) => void exitAfterFlush(code) });
  return log;
}

/** Exits once every logger's queued lines are written (bounded: a stuck stderr cannot hold the exit). */
async function exitAfterFlush(code: number): Promise<never> {
  if (loggers.length > 0) {
    const { flushLogs } = await import('../log/logger.js');
    await Promise.all(loggers.map((l) => flushLogs(l)));
  }
  process.exit(code);
}

/** What wanted a port, for a one-line "port in use" reason: the port's owner and how to move it. */
const portOwners = new Map<number, PortOwner>();

/** Parses `host:port`, allowing only loopback hosts for admin APIs. */
function loopbackAddr(v: string): { host: string; port: number } {
  const m = /^(.*):(\d+)$/.exec(v);
  if (!m) throw new CliError(`--admin-addr ${v}: expected host:port`);
  const host = m[1]!.replace(/^\[|\]$/g, '');
  if (!/^(127\.\d+\.\d+\.\d+|::1|localhost)$/.test(host)) throw new CliError(`--admin-addr ${v}: the admin API listens on loopback only`);
  return { host, port: Number(m[2]) };
}

function intArg(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new CliError(`${name} ${v}: expected a port number`);
    return n;
  };
}

/** Where `knit dev` looks for service files unless told. */
const DEFAULT_CONFIG_DIR = '/etc/knit/services.d';

/**
 * The service files `knit dev` will load, saying which directory it looked
 * in and how to point it elsewhere when that directory is missing or empty.
 */
async function devConfigDir(given: string | undefined): Promise<string> {
  const dir = resolve(given ?? DEFAULT_CONFIG_DIR);
  const which = given === undefined ? `${dir} (the default --config-dir)` : dir;
  const elsewhere = '--config-dir DIR to point knit dev at your service files (e.g. --config-dir examples/hello/services)';
  const { listServiceFiles } = await import('../config/services.js');
  let files: string[];
  try {
    files = await listServiceFiles(dir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new CliError(`no service files: ${which} does not exist; pass ${elsewhere}, or create it`);
    if (code === 'ENOTDIR') throw new CliError(`${which} is not a directory; pass ${elsewhere}`);
    throw new CliError(`cannot read ${which}: ${(e as Error).message}`);
  }
  if (files.length === 0) {
    console.error(`knit dev: no service files (*.json, *.yaml, *.yml) in ${which}; starting with none. Add files there and send SIGHUP (or POST /v1/agent/reload), or restart with ${elsewhere}`);
  }
  return dir;
}

program
  .command('dev')
  .description('the whole mesh on one host in one process: control plane, embedded registry, agent, proxies')
  .option('--config-dir <dir>', `service definitions (*.json, *.yaml, *.yml) (default: "${DEFAULT_CONFIG_DIR}")`)
  .option('--data-dir <dir>', 'CA, trust domain and registry state', devDataDir())
  .option('--admin-addr <host:port>', 'admin API address (loopback only)', '127.0.0.1:7701')
  .option('--hbone-port <port>', 'HBONE port, where other hosts would reach these services (0: any free port)', intArg('--hbone-port'), 15008)
  .option('--trust-domain <name>', 'trust domain for a new CA (default <uuid>.knit)')
  .action(async (_o: unknown, cmd: Command) => {
    const { startDev } = await import('../app/dev.js');
    const o = opts<{ configDir?: string; dataDir: string; adminAddr: string; hbonePort: number; trustDomain?: string }>(cmd);
    const admin = loopbackAddr(o.adminAddr);
    const configDir = await devConfigDir(o.configDir);
    const log = await processLogger(cmd, logLevel());
    portOwners.set(admin.port, { what: "knit dev's admin API", hint: 'is another knit dev running? --admin-addr 127.0.0.1:PORT uses another port' });
    let dev;
    try {
      dev = await startDev({
        configDir, dataDir: resolve(o.dataDir), adminHost: admin.host, adminPort: admin.port,
        hbonePort: o.hbonePort, trustDomain: o.trustDomain, initialDefault: 'allow', log,
      });
    } catch (e) {
      configFailure(e, `the service files of ${configDir}`);
    }
    for (const w of dev.warnings) console.error(`warning: ${formatProblem(w)}`);
    const out = [
      `knit dev: trust domain ${dev.trustDomain} (${dev.caCreated ? 'new CA' : 'CA'} in ${resolve(o.dataDir)})`,
      dev.defaultAction === 'allow'
        ? 'knit dev: default intention is ALLOW (development default; apply an intentions file with "default: deny" to change it)'
        : 'knit dev: default intention is deny',
      `knit dev: admin API http://${admin.host}:${dev.adminPort}, HBONE :${dev.hbonePort}`,
      ...dev.services.flatMap((s) => [
        `  ${s.name}: ${s.port ? `port ${s.port}` : 'client only'} -> app ${s.app ?? '(none)'}, ${s.health}`,
        ...s.upstreams.map((u) => `    upstream ${u.destination} on ${u.local}`),
      ]),
      'knit dev ready',
    ];
    console.log(out.join('\n'));
    // Drain bound: in-flight requests get five seconds, then connections are reset.
    lifecycle(() => dev.stop(5000), () => dev.reload());
  });

/** Prints every problem of a config error and turns it into a one-line failure. */
function configFailure(e: unknown, what: string): never {
  if (e instanceof ConfigError) {
    for (const p of e.problems) console.error(formatProblem(p));
    throw new CliError(`refusing to start: ${e.problems.length} problem(s) in ${what}`);
  }
  throw e;
}

/** SIGHUP reloads, SIGTERM/SIGINT stop with a drain, then exit 0 once the last log lines are written. */
function lifecycle(stop: () => Promise<void>, reload?: () => Promise<{ ok: boolean; problems: Parameters<typeof formatProblem>[0][] }>): void {
  if (reload) {
    process.on('SIGHUP', () => {
      void reload().then((r) => {
        if (!r.ok) console.error(`reload refused, running services kept:\n${r.problems.map(formatProblem).join('\n')}`);
      });
    });
  }
  let stopping = false;
  const onStop = (): void => {
    if (stopping) return;
    stopping = true;
    void stop().then(
      () => exitAfterFlush(0),
      (e: unknown) => {
        console.error(`knit: stopping failed: ${e instanceof Error ? e.message : String(e)}`);
        return exitAfterFlush(1);
      },
    );
  };
  process.on('SIGTERM', onStop);
  process.on('SIGINT', onStop);
}

program
  .command('server')
  .description('control plane: CA, intentions, agent enrolment (HTTPS API, default :7700)')
  .option('--config <file>', 'server config', '/etc/knit/server.yaml')
  .action(async (_o: unknown, cmd: Command) => {
    const [{ loadServerConfig }, { startServer }] = await Promise.all([import('../config/node-config.js'), import('../app/server.js')]);
    const o = opts<{ config: string }>(cmd);
    const cfg = await loadServerConfig(o.config).catch((e: unknown) => configFailure(e, o.config));
    const log = await processLogger(cmd, cfg.logLevel);
    portOwners.set(cfg.listenPort, { what: "knit server's API", hint: `is another knit server running? change listen: in ${o.config}` });
    const s = await startServer(cfg, log);
    console.log(
      [
        `knit server: trust domain ${s.trustDomain} (${s.caCreated ? 'new CA' : 'CA'} in ${cfg.dataDir}/ca)`,
        `knit server: default intention is ${cfg.defaultIntention}`,
        `knit server: API https://${cfg.listenHost}:${s.port} (operator token in ${s.operatorTokenFile})`,
        'knit server ready',
      ].join('\n'),
    );
    lifecycle(() => s.stop());
  });

program
  .command('agent')
  .description('the host agent: services, health checks, certificates, proxies')
  .option('--config <file>', 'agent config', '/etc/knit/agent.yaml')
  .action(async (_o: unknown, cmd: Command) => {
    const [{ loadAgentConfig }, { startAgent }, { EVENTS }] = await Promise.all([import('../config/node-config.js'), import('../app/agent.js'), import('../log/logger.js')]);
    const o = opts<{ config: string }>(cmd);
    const cfg = await loadAgentConfig(o.config).catch((e: unknown) => configFailure(e, o.config));
    const log = await processLogger(cmd, cfg.logLevel);
    portOwners.set(cfg.adminPort, { what: "knit agent's admin API", hint: `is another knit agent running on this host? change admin: in ${o.config}` });
    log.info({ event: EVENTS.agentStarting, node: cfg.node, server: cfg.server }, `knit agent ${cfg.node}: waiting for the control plane at ${cfg.server} and the registry`);
    const a = await startAgent(cfg, log).catch((e: unknown) => configFailure(e, `${cfg.servicesDir} or ${cfg.joinTokenFile}`));
    const how = { enrolled: 'enrolled with the join token', rejoined: 'rejoined with its recorded key', stored: 'identity loaded' }[a.identity];
    console.log(`knit agent ${a.node}: ${how} in trust domain ${a.trustDomain}; admin API http://${cfg.adminHost}:${a.adminPort}\nknit agent ready`);
    lifecycle(() => a.stop(cfg.drainMs), () => a.reload());
  });

const token = program.command('token').description('join tokens for enrolling agents');
token
  .command('create')
  .description('a single-use, expiring join token that enrols one node and names the services it may run')
  .requiredOption('--node <name>', 'the node (host) this token enrols; the agent must run with node: <name>')
  .requiredOption('--services <list>', 'services the node may run, comma-separated; a trailing * is a glob (web-*)')
  .option('--ttl <duration>', 'how long the token stays valid', '1h')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<{ node: string; services: string; ttl: string }>(cmd);
    const services = o.services.split(',').map((x) => x.trim()).filter(Boolean);
    const t = await api<{ token: string; expiresAt: string; node: string; services: string[] }>(o, 'POST', '/v1/tokens', { ttl: o.ttl, node: o.node, services });
    console.log(o.json ? JSON.stringify(t) : t.token);
  });

interface NodeView {
  node: string;
  services: string[];
  keyFingerprint?: string;
  agentCertExpires?: string;
  enrolledAt?: string;
  lastSeen?: string;
  revokedAt?: string;
  evicted?: string[];
}
const nodeLine = (n: NodeView): string =>
  `${n.node}  services=${n.services.join(',')}  ${n.revokedAt ? `REVOKED ${n.revokedAt}` : `cert until ${n.agentCertExpires ?? '-'}`}  last seen ${n.lastSeen ?? '-'}  key ${n.keyFingerprint?.slice(0, 16) ?? '-'}`;

const node = program.command('node').description('nodes (hosts) and the services each may run; kept by the control plane');
node
  .command('list')
  .description('every node: allowed services, key fingerprint, certificate expiry, last seen, revocation')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    const list = await api<NodeView[]>(o, 'GET', '/v1/nodes');
    if (o.json) return console.log(JSON.stringify(list, null, 1));
    console.log(list.length ? list.map(nodeLine).join('\n') : 'no nodes enrolled');
  });
node
  .command('set')
  .description('the services NODE may run (takes effect on its next signing; removed services are not renewed)')
  .argument('<node>')
  .requiredOption('--services <list>', 'comma-separated; a trailing * is a glob (web-*)')
  .action(async (name: string, _o: unknown, cmd: Command) => {
    const o = opts<{ services: string }>(cmd);
    const services = o.services.split(',').map((x) => x.trim()).filter(Boolean);
    const n = await api<NodeView>(o, 'PUT', `/v1/nodes/${encodeURIComponent(name)}`, { services });
    console.log(o.json ? JSON.stringify(n) : nodeLine(n));
  });
node
  .command('revoke')
  .description('no more renewals or signings for NODE; its registrations are removed and peers stop routing to it')
  .argument('<node>')
  .action(async (name: string, _o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    const n = await api<NodeView>(o, 'POST', `/v1/nodes/${encodeURIComponent(name)}/revoke`, {});
    console.log(o.json ? JSON.stringify(n) : `${nodeLine(n)}\nremoved ${n.evicted?.length ?? 0} instance(s)`);
  });

program
  .command('validate')
  .description('check service, intention and agent/server config files; prints every error with file, line and field')
  .argument('<dir-or-file>')
  .option('--allow-remote-upstreams', 'accept upstreams on non-loopback addresses (as agent.yaml allow_remote_upstreams: true)')
  .action(async (target: string, _o: unknown, cmd: Command) => {
    const { validate, printValidate } = await import('./validate.js');
    const o = opts<{ allowRemoteUpstreams?: boolean }>(cmd);
    process.exitCode = printValidate(await validate(target, { allowRemoteUpstreams: !!o.allowRemoteUpstreams }), !!o.json);
  });

program
  .command('services')
  .description('services and their healthy instances as the registry sees them')
  .option('--watch', 'print again whenever something changes (with --json: one compact JSON document per line)')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<{ watch?: boolean }>(cmd);
    let last = '';
    for (;;) {
      const list = await api<Array<Omit<ServiceSummary, 'instances'> & { instances: Instance[] }>>(o, 'GET', '/v1/services');
      const text = o.json
        ? // Watching: one document per line, so that `| while read` and jq -c consumers see whole documents.
          o.watch ? JSON.stringify(list) : JSON.stringify(list, null, 1)
        : list.length === 0
          ? 'no services registered'
          : list
              .map((s) => [`${s.name}  ${s.routable}/${s.instances.length} routable`, ...s.instances.map((i) => `  ${i.id}  ${i.address}:${i.port}  ${i.health}`)].join('\n'))
              .join('\n');
      if (text !== last) console.log(o.watch && last && !o.json ? `\n${text}` : text);
      last = text;
      if (!o.watch) return;
      await new Promise((r) => setTimeout(r, 1000));
    }
  });

interface IntentionsView {
  default: string;
  intentions: Array<{ source: string; destination: string; action: string }>;
}
const printIntentions = (v: IntentionsView, json?: boolean): void => {
  if (json) return console.log(JSON.stringify(v, null, 1));
  console.log(`default: ${v.default}`);
  for (const i of v.intentions) console.log(`${i.source} -> ${i.destination}: ${i.action}`);
};

const intention = program.command('intention').description('manage intentions (allow/deny between services)');
for (const act of ['allow', 'deny'] as const) {
  intention
    .command(act)
    .description(`${act} connections from SRC to DST (either may be "*")`)
    .argument('<src>')
    .argument('<dst>')
    .action(async (source: string, destination: string, _o: unknown, cmd: Command) => {
      const o = opts<object>(cmd);
      await api(o, 'PUT', '/v1/intentions', { source, destination, action: act });
      if (o.json) console.log(JSON.stringify({ source, destination, action: act }));
      else console.log(`${source} -> ${destination}: ${act}`);
    });
}
intention
  .command('delete')
  .description('delete the intention from SRC to DST')
  .argument('<src>')
  .argument('<dst>')
  .action(async (source: string, destination: string, _o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    await api(o, 'DELETE', `/v1/intentions?source=${encodeURIComponent(source)}&destination=${encodeURIComponent(destination)}`);
    if (o.json) console.log(JSON.stringify({ source, destination, deleted: true }));
    else console.log(`deleted ${source} -> ${destination}`);
  });
intention
  .command('list')
  .description('list intentions by precedence, and the default')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    printIntentions(await api<IntentionsView>(o, 'GET', '/v1/intentions'), o.json);
  });
intention
  .command('apply')
  .description('replace all intentions with those of a file (and its default, if it sets one)')
  .requiredOption('-f, --file <file>', 'intentions file (YAML or JSON)')
  .action(async (_o: unknown, cmd: Command) => {
    const { readIntentionsFile } = await import('../config/intentions-file.js');
    const o = opts<{ file: string }>(cmd);
    let f;
    try {
      f = await readIntentionsFile(o.file);
    } catch (e) {
      if (e instanceof ConfigError) {
        for (const p of e.problems) console.error(formatProblem(p));
        throw new CliError(`nothing applied: ${e.problems.length} problem(s) in ${o.file}`);
      }
      throw e;
    }
    const v = await api<IntentionsView>(o, 'POST', '/v1/intentions/apply', { default: f.defaultAction, intentions: f.intentions });
    if (!o.json) console.log(`applied ${f.intentions.length} intention(s) from ${o.file}`);
    printIntentions(v, o.json);
  });

/** `knit intention check` exit statuses, as `consul intention check`: so scripts can branch on the decision. */
const CHECK_EXIT = { allowed: 0, denied: 1, error: 2 } as const;

intention
  .command('check')
  .description(`the decision for SRC -> DST and the rule (or default) behind it; exits ${CHECK_EXIT.allowed} when allowed, ${CHECK_EXIT.denied} when denied, ${CHECK_EXIT.error} on error (as consul intention check)`)
  .argument('<src>')
  .argument('<dst>')
  // A usage error must not read as "denied" (1): Consul exits 2 for those too.
  .exitOverride((err) => {
    throw new CommanderError(err.exitCode === 0 ? 0 : CHECK_EXIT.error, err.code, err.message);
  })
  .action(async (source: string, destination: string, _o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    let d: { allow: boolean; rule: string };
    try {
      d = await api<{ allow: boolean; rule: string }>(o, 'GET', `/v1/intentions/check?source=${encodeURIComponent(source)}&destination=${encodeURIComponent(destination)}`);
    } catch (e) {
      throw new CliError(e instanceof Error ? e.message : String(e), CHECK_EXIT.error);
    }
    if (o.json) console.log(JSON.stringify({ source, destination, ...d }));
    else console.log(`${d.allow ? 'allowed' : 'denied'}: ${source} -> ${destination} by ${d.rule}`);
    process.exitCode = d.allow ? CHECK_EXIT.allowed : CHECK_EXIT.denied;
  });

const ca = program.command('ca').description('the certificate authority');
ca.command('roots')
  .description('print the trust bundle (PEM)')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    const r = await api<{ trustDomain: string; roots: string[] }>(o, 'GET', '/v1/ca/roots');
    console.log(o.json ? JSON.stringify(r, null, 1) : r.roots.join('\n').trim());
  });

interface FlowsView {
  node: string;
  flows: Array<{ id: number; side: string; source: { service: string; id?: string; address?: string }; destination: { service: string; id?: string; address?: string }; rule?: string; bytesSent: number; bytesReceived: number; ageMs: number; tunnel?: string }>;
  tunnels: Array<{ key: { source: string; destination: string; agent: string }; active: number; carried: number; retiring: boolean }>;
}

program
  .command('flows')
  .description('open connections on this host: source, destination, identities, bytes, age; and the HBONE tunnels carrying them')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    const v = await api<FlowsView>(o, 'GET', '/v1/flows');
    if (o.json) return console.log(JSON.stringify(v, null, 1));
    if (!v.flows.length) console.log(`no open flows on ${v.node}`);
    for (const f of v.flows) {
      const src = `${f.source.service}${f.source.address ? `@${f.source.address}` : ''}`;
      const dst = `${f.destination.service}${f.destination.address ? `@${f.destination.address}` : ''}`;
      console.log(`${String(f.id).padStart(5)} ${f.side.padEnd(8)} ${src} -> ${dst}  sent ${f.bytesSent} B, received ${f.bytesReceived} B, ${Math.round(f.ageMs / 1000)} s${f.rule ? `  [${f.rule}]` : ''}${f.tunnel ? `  via ${f.tunnel}` : ''}`);
    }
    for (const t of v.tunnels) console.log(`tunnel ${t.key.source} -> ${t.key.destination} @ ${t.key.agent}: ${t.active} open stream(s), ${t.carried} carried${t.retiring ? ', retiring' : ''}`);
  });

/** A repeatable option whose values may also be comma lists (`--exclude-uid 1,2 --exclude-uid 3`). */
function listArg<T>(flag: string, parse: (v: string) => T | undefined, what: string) {
  return (v: string, previous: T[] | undefined): T[] => [
    ...(previous ?? []),
    ...v.split(',').map((x) => x.trim()).filter(Boolean).map((x) => {
      const got = parse(x);
      if (got === undefined) throw new CliError(`${flag} ${x}: not ${what}`);
      return got;
    }),
  ];
}
const portValue = (v: string): number | undefined => (/^\d+$/.test(v) && Number(v) >= 1 && Number(v) <= 65535 ? Number(v) : undefined);
const uidValue = (v: string): number | undefined => (/^\d+$/.test(v) && Number(v) <= 4_294_967_294 ? Number(v) : undefined);

program
  .command('redirect-traffic')
  .description('install, show (--status) or remove (--cleanup) the netfilter rules of transparent mode: nftables table "inet knit", or knit\'s own iptables chains')
  .option('--config <file>', 'agent config: its transparent: section and services_dir', '/etc/knit/agent.yaml')
  .option('--netns <name>', 'inside this network namespace (ip netns exec), e.g. a pod\'s')
  .option('--status', 'show what is installed and whether it matches the config; exits 1 when not installed or not matching')
  .option('--cleanup', 'remove exactly what knit added (nothing else changes); nothing to do is no error')
  .addOption(new Option('--backend <backend>', 'force a backend (default: nft, else iptables)').choices(['nft', 'iptables']))
  .option('--exclude-inbound-port <ports>', 'ports never captured inbound, replacing the config\'s (repeatable or comma list)', listArg('--exclude-inbound-port', portValue, 'a port (1 to 65535)'))
  .option('--exclude-outbound-port <ports>', 'destination ports never captured, replacing the config\'s', listArg('--exclude-outbound-port', portValue, 'a port (1 to 65535)'))
  .option('--exclude-cidr <cidrs>', 'destination networks never captured, replacing the config\'s', listArg('--exclude-cidr', (v) => v, 'a CIDR'))
  .option('--exclude-uid <uids>', 'uids whose connections are never captured, replacing the config\'s', listArg('--exclude-uid', uidValue, 'a uid'))
  .action(async (_o: unknown, cmd: Command) => {
    type RedirectFlags = { config: string; netns?: string; status?: boolean; cleanup?: boolean; backend?: 'nft' | 'iptables'; excludeInboundPort?: number[]; excludeOutboundPort?: number[]; excludeCidr?: string[]; excludeUid?: number[] };
    const o = opts<RedirectFlags>(cmd);
    if (o.status && o.cleanup) throw new CliError('--status and --cleanup: choose one');
    const [{ redirectTraffic }, { parseCidr, planRedirect }] = await Promise.all([import('../app/redirect.js'), import('../proxy/transparent/netfilter-spec.js')]);
    const bad = o.excludeCidr?.find((c) => !parseCidr(c));
    if (bad !== undefined) throw new CliError(`--exclude-cidr ${bad}: not a CIDR (e.g. 10.0.0.0/8, fd00::/8, or one address)`);
    let r;
    try {
      r = await redirectTraffic({
        action: o.status ? 'status' : o.cleanup ? 'cleanup' : 'install',
        configFile: o.config,
        configGiven: cmd.getOptionValueSource('config') !== 'default',
        netns: o.netns,
        backend: o.backend,
        overrides: { excludeInboundPorts: o.excludeInboundPort, excludeOutboundPorts: o.excludeOutboundPort, excludeCidrs: o.excludeCidr, excludeUids: o.excludeUid },
      });
    } catch (e) {
      if (e instanceof ConfigError && e.problems.length > 1) configFailure(e, o.config);
      throw e;
    }
    const where = o.netns ? ` in network namespace ${o.netns}` : '';
    if (r.action === 'status') process.exitCode = r.status.installed && r.status.matches !== false ? 0 : 1;
    if (o.json) {
      const data = r.action === 'status' ? { ...r.status, comparedWith: r.comparedWith } : r.action === 'install' ? { ...r.result, spec: r.spec } : r.result;
      return console.log(JSON.stringify(data, null, 1));
    }
    const what = (b: { backend: string; variant?: string; objects: string[] }): string => `${b.backend}${b.variant ? ` (${b.variant})` : ''}: ${b.objects.join(', ')}`;
    const lines: string[] = [];
    if (r.action === 'cleanup') {
      lines.push(r.result.removed.length ? `knit redirect-traffic: removed${where}: ${r.result.removed.join(', ')}` : `knit redirect-traffic: nothing to remove${where}: knit's redirect is not installed`);
    } else if (r.action === 'install') {
      const { spec: s, result: x } = r;
      const excluded = [`ports ${s.excludeOutboundPorts.join(', ') || '-'}`, `networks ${s.excludeCidrs.join(', ') || '-'}`, `uids ${s.agentUid} (the agent)${s.excludeUids.length ? `, ${s.excludeUids.join(', ')}` : ''}`].join('; ');
      lines.push(
        `knit redirect-traffic: ${x.replaced ? 'replaced' : 'installed'}${where} with ${what(x)} (${x.rules} rules)`,
        `  outbound ${s.outbound}: ${s.outbound === 'deny' ? 'all TCP' : `mesh destinations (the agent fills them in) and ${s.vipCidrs.join(', ')}`} -> :${s.outboundPort}; never: loopback; ${excluded}`,
        `  inbound ports ${planRedirect(s).inboundPorts.join(', ') || '(none)'} -> :${s.inboundPort}; HBONE :${s.hbonePort} and all else untouched`,
        `  DNS: ${s.captureDns ? `port 53 -> 127.0.0.1/::1 :${s.dnsPort}` : 'not captured'}`,
        ...(x.removedOther.length ? [`  removed knit's rules of the other backend: ${x.removedOther.join(', ')}`] : []),
        ...x.notes.map((n) => `  note: ${n}`),
      );
    } else {
      const st = r.status;
      if (!st.installed) lines.push(`knit's redirect is not installed${where}`);
      for (const b of st.backends) lines.push(`knit's redirect is installed${where} with ${what(b)}: ${b.rules} rules, ${b.destinations} mesh destination(s)`);
      if (st.installed && r.comparedWith) {
        const flags = [o.excludeInboundPort, o.excludeOutboundPort, o.excludeCidr, o.excludeUid].some(Boolean) ? ' and the flags' : '';
        lines.push(st.matches ? `matches ${r.comparedWith}${flags}` : `does not match ${r.comparedWith}${flags} (- expected, + installed); knit redirect-traffic replaces it:`);
        for (const b of st.backends) for (const d of b.differences ?? []) lines.push(`  ${d}`);
      }
      lines.push(...st.notes.map((n) => `note: ${n}`));
    }
    console.log(lines.join('\n'));
  });

program
  .command('check')
  .description('diagnostics to run when something is wrong')
  .action(async (_o: unknown, cmd: Command) => {
    const o = opts<object>(cmd);
    const findings: Array<{ level: 'ok' | 'warn' | 'error'; what: string }> = [];
    const state = await api<{ node: string; trustDomain: string; services: ServiceState[]; transparent?: { rules: { installed: boolean; error?: string }; unauthenticated: Array<{ service: string; callers: Array<{ address: string; count: number; lastSeen: string }> }> } }>(o, 'GET', '/v1/state');
    findings.push({ level: 'ok', what: `agent ${state.node} in trust domain ${state.trustDomain}, ${state.services.length} service(s)` });
    const soon = Date.now() + 3600_000;
    for (const s of state.services) {
      if (s.waiting) {
        findings.push({ level: 'error', what: `${s.name} is not running: ${s.waiting.replace(/^control plane \/v1\/agent\/sign: /, '')}` });
        continue;
      }
      if (s.health === 'critical') findings.push({ level: 'error', what: `${s.name} is critical: ${s.checks.filter((c) => c.status !== 'passing').map((c) => `${c.id}: ${c.output}`).join('; ')}` });
      else if (s.health === 'warning') findings.push({ level: 'warn', what: `${s.name} is warning` });
      if (s.certificateExpires && Date.parse(s.certificateExpires) < soon) findings.push({ level: 'warn', what: `${s.name}'s certificate expires at ${s.certificateExpires}` });
      for (const u of s.upstreams) {
        if (!u.endpoints.length) findings.push({ level: 'error', what: `${s.name} -> ${u.destination}: no healthy instance (connections to ${u.local} are reset)` });
        const d = await api<{ allow: boolean; rule: string }>(o, 'GET', `/v1/intentions/check?source=${encodeURIComponent(s.name)}&destination=${encodeURIComponent(u.destination)}`).catch(() => undefined);
        if (d && !d.allow) findings.push({ level: 'error', what: `${s.name} -> ${u.destination} is denied by ${d.rule}` });
      }
    }
    const tp = state.transparent;
    if (tp) {
      if (tp.rules.error) findings.push({ level: 'error', what: `transparent mode: redirect rules not installed: ${tp.rules.error}` });
      for (const s of state.services.filter((x) => x.inbound === 'permissive')) {
        const callers = tp.unauthenticated.find((u) => u.service === s.name)?.callers ?? [];
        const who = callers.length ? `plaintext callers in the last hour: ${callers.map((c) => `${c.address} (${c.count}, last ${c.lastSeen})`).join(', ')}` : 'no plaintext caller in the last hour: it can be made strict';
        findings.push({ level: 'warn', what: `${s.name} is permissive (connect.inbound): ${who}` });
      }
    }
    if (o.json) console.log(JSON.stringify(findings, null, 1));
    else for (const f of findings) console.log(`${f.level.padEnd(5)} ${f.what}`);
    if (findings.some((f) => f.level === 'error')) process.exitCode = 1;
  });

program.parseAsync(process.argv).catch(async (e: unknown) => {
  // Commander has already printed its own usage error (or help).
  if (e instanceof CommanderError) return exitAfterFlush(e.exitCode);
  const msg = listenFailure(e, portOwners) ?? (e instanceof CliError || e instanceof KnitError ? e.message : e instanceof Error ? e.message : String(e));
  console.error(`knit: ${msg}`);
  return exitAfterFlush(e instanceof CliError ? e.exitCode : 1);
});
