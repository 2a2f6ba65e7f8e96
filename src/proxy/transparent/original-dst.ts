/**
 * Where a transparently captured connection was really going.
 *
 * In transparent mode netfilter rewrites an application's outbound (or a
 * peer's inbound) TCP connection to the capture port with a NAT REDIRECT
 * rule; the proxy accepts it there and must learn the address and port the
 * application asked for. Only connection tracking still knows that, through
 * getsockopt(SO_ORIGINAL_DST), which Node does not expose: the small native
 * addon built from native/original_dst.cc (binding.gyp) makes that one call.
 *
 * The addon is loaded on first use, not on import, so only a process that
 * runs transparent capture maps it in, and a host where it was never built
 * still runs every other mode. Being unable to answer is a value with a
 * reason, never a throw: the capture refuses that one connection and says
 * why.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The destination a redirected connection had before NAT rewrote it. */
export interface OriginalDestination {
  address: string;
  port: number;
  /** Which socket option answered: 4 for IPv4 (also for an IPv4-mapped IPv6 socket), 6 for IPv6. */
  family: 4 | 6;
}

/** Why no original destination could be recovered. */
export interface NoOriginalDestination {
  error: string;
}

/** The addon's one export, as native/original_dst.cc defines it. */
interface OriginalDstAddon {
  /** Throws an Error naming the errno (`code` is its name) when getsockopt fails. */
  originalDst(fd: number, family: 4 | 6): { address: string; port: number };
}

/** The loaded addon, or why it could not be loaded and how to fix that. */
export type AddonLoad = { addon: OriginalDstAddon } | NoOriginalDestination;

/** Where node-gyp puts the addon, relative to the package root. */
export const ADDON_FILE = join('build', 'Release', 'original_dst.node');

/**
 * The nearest directory at or above `from` holding a package.json: the
 * package root whether this module runs as src/proxy/transparent/*.ts under
 * tsx, as dist/proxy/transparent/*.js, or from an install under
 * /usr/local/lib/knit (all of which keep build/ beside package.json).
 */
export function packageRoot(from: string = dirname(fileURLToPath(import.meta.url))): string | undefined {
  for (let dir = from; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    if (dirname(dir) === dir) return undefined;
  }
}

/**
 * Loads the addon from `<root>/build/Release/original_dst.node`. A failure
 * comes back as a value that says how to build it.
 */
export function loadAddon(root: string | undefined = packageRoot()): AddonLoad {
  if (root === undefined) return { error: `cannot find knit's package root (no package.json above ${fileURLToPath(import.meta.url)}) to load ${ADDON_FILE} from` };
  const file = join(root, ADDON_FILE);
  try {
    // createRequire: an ES module cannot import a .node file; require can.
    const loaded = createRequire(import.meta.url)(file) as Partial<OriginalDstAddon>;
    if (typeof loaded.originalDst !== 'function') return { error: `${file} does not export originalDst(): rebuild it with \`npm rebuild\` in ${root}` };
    return { addon: loaded as OriginalDstAddon };
  } catch (e) {
    const why = e instanceof Error ? e.message.split('\n')[0] : String(e);
    return {
      error:
        `transparent capture needs the native addon ${file}, which could not be loaded (${why}); ` +
        `build it with \`npm rebuild\` in ${root} (needs python3, make and g++), or reinstall with scripts/install.sh`,
    };
  }
}

// The one piece of module-level state here, on purpose: a cache of an
// immutable, process-wide fact. Node's require cache already makes a loaded
// .node file a per-process singleton (it cannot be unloaded or reloaded),
// and caching a failure too saves a filesystem probe on every captured
// connection; a rebuilt addon takes effect at the next restart either way.
let defaultLoad: AddonLoad | undefined;

/**
 * The socket's file descriptor, or undefined when it has none. Node offers
 * no public way to get it: `_handle` is the libuv TCP handle behind a
 * net.Socket and `fd` its descriptor on Unix (-1 once closed, absent before
 * the socket is connected or for a socket not backed by a TCP handle).
 */
function descriptorOf(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : undefined;
}

const MAPPED_IPV4 = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i;

/**
 * Which socket option to ask: the IPv4 one for an IPv4 socket and also for
 * an IPv6 socket carrying IPv4 (`::ffff:a.b.c.d`, a dual-stack listener on
 * `::`), since conntrack tracked that connection as IPv4.
 */
function familyOf(socket: Socket): 4 | 6 | undefined {
  const local = socket.localAddress;
  if (local !== undefined && MAPPED_IPV4.test(local)) return 4;
  const family = socket.localFamily ?? socket.remoteFamily;
  if (family === 'IPv4') return 4;
  if (family === 'IPv6') return 6;
  return undefined;
}

/**
 * The destination `socket` (an accepted, redirected TCP connection) was
 * addressed to before a NAT REDIRECT rule sent it to the capture port, or
 * why that cannot be told: the addon is not built, the socket has no
 * descriptor, or the kernel has no such connection tracked ("...(ENOENT):
 * the connection was not redirected"). Call it while the socket is open.
 * `load` is for tests; by default the addon is loaded once, on first call.
 */
export function originalDestination(socket: Socket, load: () => AddonLoad = () => (defaultLoad ??= loadAddon())): OriginalDestination | NoOriginalDestination {
  const fd = descriptorOf(socket);
  if (fd === undefined) return { error: 'the socket has no file descriptor (not connected yet, already closed, or not a TCP socket)' };
  const family = familyOf(socket);
  if (family === undefined) return { error: 'the socket has no local address, so its address family is unknown' };
  const loaded = load();
  if ('error' in loaded) return loaded;
  try {
    const dst = loaded.addon.originalDst(fd, family);
    return { address: dst.address, port: dst.port, family };
  } catch (e) {
    return { error: e instanceof Error ? e.message : String(e) };
  }
}

/** One spelling per address: IPv4-mapped IPv6 as plain IPv4, IPv6 as eight full lowercase groups, no zone. */
function canonical(address: string): string {
  const mapped = MAPPED_IPV4.exec(address);
  if (mapped) return mapped[1]!;
  if (!address.includes(':')) return address;
  const bare = address.split('%')[0]!.toLowerCase();
  const [head = '', tail] = bare.split('::');
  const left = head === '' ? [] : head.split(':');
  const right = tail === undefined || tail === '' ? [] : tail.split(':');
  const middle = tail === undefined ? [] : Array<string>(Math.max(0, 8 - left.length - right.length)).fill('0');
  return [...left, ...middle, ...right].map((g) => g.padStart(4, '0')).join(':');
}

/**
 * True when the "original" destination is the socket's own local address
 * and port: nothing rewrote the connection, it was made straight to the
 * capture port (conntrack still answers, with the address it was sent to).
 * The capture must refuse such a connection rather than forward it to
 * itself in a loop.
 */
export function notRedirected(socket: Socket, dst: { address: string; port: number }): boolean {
  const local = socket.localAddress;
  return local !== undefined && socket.localPort === dst.port && canonical(local) === canonical(dst.address);
}
