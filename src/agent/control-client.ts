/**
 * The agent's client of the control plane (`knit server`) over HTTPS:
 * enrolment with a join token, renewal of its own identity with that
 * identity, rejoin after its certificate expired (proof of the recorded
 * key over a fresh server nonce), and service leaves.
 *
 * Enrolment trusts exactly what the token pins: the one root whose SHA-256
 * the token carries. The trust domain is read from that root's SPIFFE ID,
 * the token is sent only over a connection whose server certificate chains
 * to it and proves `spiffe://<td>/server/<name>`, and the returned leaf is
 * checked against it (signature, validity, URI SAN). Roots a server merely
 * lists are never added; certificates it returns later are chain-checked
 * against the pinned bundle before they are stored or used.
 *
 * HTTPS with node:https rather than an HTTP client library: an agent makes
 * a few requests a day, and undici would cost it ~20 MB of memory to load.
 */
import { sign as cryptoSign, X509Certificate } from 'node:crypto';
import https from 'node:https';
import type { PeerCertificate } from 'node:tls';
import { KnitError } from '../errors.js';
import { agentId, type SpiffeId } from '../identity/spiffe.js';
import { certInfo, certInfoFromDer, splitPem } from '../identity/x509.js';
import { createCsr, validateLeaf, type SignedLeaf } from '../identity/csr.js';
import { verifyChain } from '../identity/chain.js';
import type { ServiceTls } from '../identity/tls.js';
import type { CertSigner } from '../identity/leaf.js';
import { caHash, parseJoinToken, rejoinProofInput } from '../identity/enrolment.js';

/** Checks that a server certificate carries a control-plane identity of `trustDomain`. */
export function checkServer(trustDomain: string | undefined) {
  // The code lets callers tell an impostor from an outage.
  const bad = (why: string): Error => Object.assign(new Error(why), { code: 'KNIT_SERVER_CERT_IDENTITY' });
  return (_host: string, cert: PeerCertificate): Error | undefined => {
    try {
      const info = certInfoFromDer(cert.raw);
      if (info.uris.length !== 1) return bad(`control plane certificate has ${info.uris.length} URI SANs`);
      const id = info.spiffeId;
      if (!id) return bad(`control plane URI SAN ${info.uris[0]} is not a SPIFFE ID`);
      if (id.what.kind !== 'server') return bad(`${id.uri} is not a control-plane identity`);
      if (trustDomain && id.trustDomain !== trustDomain) return bad(`${id.uri} is not in trust domain ${trustDomain}`);
    } catch (e) {
      return bad((e as Error).message);
    }
    return undefined;
  };
}

/** What the control plane answers to enrolment, renewal and rejoin. */
interface Signed {
  cert: string;
  chain: string[];
  /** The agent's registry credential (`user:password`), when the registry has ACLs. */
  registryAuth?: string;
}

/** How long one exchange with the control plane may take, connection and answer included. */
const TIMEOUT_MS = 15_000;
/** The most of an answer read: a certificate chain or a list of roots is a few kB; a server sending more is not the control plane. */
const MAX_ANSWER_BYTES = 1024 * 1024;

/**
 * Connections to the control plane for one set of TLS material: an
 * https.Agent (keep-alive: renewal and the signing of a node's service
 * leaves come in bursts) and the exchanges using it, so that retiring it
 * lets those finish before its sockets are destroyed.
 */
class Connection {
  readonly agent: https.Agent;
  private active = 0;
  private retired = false;

  constructor(tlsOptions: https.AgentOptions) {
    // keepAlive frees idle sockets unref'd, so an idle connection never holds the process open.
    this.agent = new https.Agent({ keepAlive: true, ...tlsOptions });
  }

  /** Runs `fn` as one exchange on this connection. */
  async use<T>(fn: (agent: https.Agent) => Promise<T>): Promise<T> {
    this.active++;
    try {
      return await fn(this.agent);
    } finally {
      this.active--;
      if (this.retired && this.active === 0) this.agent.destroy();
    }
  }

  /** Closes the sockets once the exchanges in flight are done (at once when none are); one started later closes them again when it ends. */
  retire(): void {
    this.retired = true;
    if (this.active === 0) this.agent.destroy();
  }
}

/** An HTTP answer, read whole. */
interface Answer {
  status: number;
  body: Buffer;
}

/**
 * One HTTPS exchange: sends `body` (if any), reads the whole answer, all
 * within TIMEOUT_MS. Rejects with the socket's or TLS's own error (its
 * `code` is what `post` classifies), or ETIMEDOUT.
 */
function exchange(url: string, method: 'GET' | 'POST', agent: https.Agent, body?: string): Promise<Answer> {
  return new Promise<Answer>((resolve, reject) => {
    const headers: Record<string, string | number> = { accept: 'application/json' };
    if (body !== undefined) Object.assign(headers, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    let settled = false;
    const finish = (err: Error | undefined, answer?: Answer): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve(answer!);
    };
    let req: ReturnType<typeof https.request>;
    try {
      req = https.request(url, { method, agent, headers });
    } catch (e) {
      // A URL https cannot use; config validation (https:// only) makes this unlikely.
      reject(e instanceof Error ? e : new Error(String(e)));
      return;
    }
    /** Ends the exchange with `err` (ours, not the 'aborted' the destroyed socket would report). */
    const abort = (err: Error): void => {
      finish(err);
      req.destroy(err);
    };
    const timer = setTimeout(() => abort(Object.assign(new Error(`no answer within ${TIMEOUT_MS / 1000} s`), { code: 'ETIMEDOUT' })), TIMEOUT_MS);
    // `on`, not `once`: a destroyed request may report more than one error, and an unheard one would crash the process.
    req.on('error', (e) => finish(e));
    req.once('response', (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size > MAX_ANSWER_BYTES) abort(Object.assign(new Error(`answer larger than ${MAX_ANSWER_BYTES} bytes`), { code: 'KNIT_ANSWER_TOO_LARGE' }));
        else chunks.push(c);
      });
      res.on('error', (e) => finish(e));
      res.once('end', () => finish(undefined, { status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      res.once('close', () => finish(Object.assign(new Error('connection closed before the answer was complete'), { code: 'ECONNRESET' })));
    });
    req.end(body);
  });
}

/** Reads an answer as JSON; anything else reads as `{}`, which the callers refuse for what it lacks. */
function json<T>(a: Answer): T {
  try {
    const v: unknown = JSON.parse(a.body.toString('utf8'));
    return (typeof v === 'object' && v !== null ? v : {}) as T;
  } catch {
    return {} as T;
  }
}

/** POSTs JSON; maps transport failures to KNIT_ERR_SERVER_UNAVAILABLE and error answers to their code. */
async function post<T>(server: string, path: string, body: unknown, agent: https.Agent): Promise<T> {
  let res: Answer;
  try {
    res = await exchange(`${server}${path}`, 'POST', agent, JSON.stringify(body));
  } catch (e) {
    const raw = (e as { code?: unknown }).code ?? (e as { cause?: { code?: unknown } }).cause?.code;
    const code = typeof raw === 'string' ? raw : '';
    if (/CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/.test(code)) {
      // Not a passing fault: the server is not the one the pinned root vouches for. Nothing was sent.
      throw new KnitError('KNIT_ERR_UNAUTHORIZED', `the control plane at ${server} presented a certificate that does not chain to the pinned trust root or is not a control-plane identity (${code}: ${(e as Error).message}); refusing to talk to it`, { cause: e });
    }
    throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', `control plane ${server} unreachable: ${(e as Error).message}`, { cause: e });
  }
  const answer = json<T & { error?: string; code?: string }>(res);
  if (res.status >= 400) {
    const code = answer.code === 'KNIT_ERR_UNAUTHORIZED' || answer.code === 'KNIT_ERR_BAD_REQUEST' || answer.code === 'KNIT_ERR_CA' ? answer.code : 'KNIT_ERR_SERVER_UNAVAILABLE';
    throw new KnitError(code, `control plane ${path}: ${answer.error ?? `HTTP ${res.status}`}`);
  }
  return answer;
}

/** Checks a leaf the control plane returned against the pinned roots and the identity asked for. */
function checkLeaf(s: Signed, id: SpiffeId, roots: string[]): SignedLeaf {
  if (typeof s.cert !== 'string') throw new KnitError('KNIT_ERR_CERT', `control plane returned no certificate for ${id.uri}`);
  const chain = Array.isArray(s.chain) ? s.chain : [];
  validateLeaf(s.cert, id);
  verifyChain(`certificate for ${id.uri}`, s.cert, chain, roots);
  return { certPem: s.cert, chainPem: chain, notAfter: new Date(new X509Certificate(s.cert).validTo) };
}

const material = (leaf: SignedLeaf, keyPem: string, roots: string[]): ServiceTls => ({ certChainPem: [leaf.certPem, ...leaf.chainPem].join('\n'), keyPem, trustBundlePem: roots });

/**
 * Fetches the server's roots without trusting it yet and keeps only the
 * one whose hash the join token carries; the trust domain is that root's.
 */
async function pinnedRoot(server: string, expectedHash: string): Promise<{ root: string; trustDomain: string }> {
  // Not trusted yet, so not verified: what it answers is only kept if the token's hash matches.
  const insecure = new https.Agent({ rejectUnauthorized: false });
  let got: { roots?: unknown };
  try {
    got = json<{ roots?: unknown }>(await exchange(`${server}/v1/ca/roots`, 'GET', insecure));
  } catch (e) {
    throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', `control plane ${server} unreachable: ${(e as Error).message}`, { cause: e });
  } finally {
    insecure.destroy();
  }
  const roots = Array.isArray(got.roots) ? got.roots.filter((r): r is string => typeof r === 'string') : [];
  const root = roots.find((r) => {
    try {
      return caHash(r) === expectedHash;
    } catch {
      return false;
    }
  });
  if (!root) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `the control plane at ${server} does not hold the CA named in the join token: refusing to enrol`);
  const id = certInfo(root).spiffeId;
  if (!id || id.path !== '') throw new KnitError('KNIT_ERR_UNAUTHORIZED', `the pinned root of ${server} carries no trust-domain SPIFFE ID: refusing to enrol`);
  return { root, trustDomain: id.trustDomain };
}

/** An agent identity as enrolment and rejoin return it. */
export interface AgentIdentity {
  tls: ServiceTls;
  trustDomain: string;
  registryAuth?: string;
}

/** Enrols a node with a join token; the key is made here. Returns the agent's first identity. */
export async function enrol(server: string, token: string, node: string): Promise<AgentIdentity> {
  const { caHash: expected } = parseJoinToken(token);
  const { root, trustDomain } = await pinnedRoot(server, expected);
  const roots = [root];
  const id = agentId(trustDomain, node);
  const { keyPem, csrPem } = await createCsr(id);
  const conn = new Connection({ ca: roots, checkServerIdentity: checkServer(trustDomain) });
  try {
    const s = await conn.use((agent) => post<Signed>(server, '/v1/agent/enrol', { token: token.trim(), csr: csrPem }, agent));
    return { tls: material(checkLeaf(s, id, roots), keyPem, roots), trustDomain, registryAuth: s.registryAuth };
  } finally {
    conn.retire();
  }
}

/** Asks for a nonce and sends the rejoin proof for `csrPem`, signed with `current`'s key. */
async function rejoinWith(server: string, current: ServiceTls, trustDomain: string, node: string, csrPem: string): Promise<Signed> {
  const conn = new Connection({ ca: current.trustBundlePem, checkServerIdentity: checkServer(trustDomain) });
  try {
    return await conn.use(async (agent) => {
      const { nonce } = await post<{ nonce: string }>(server, '/v1/agent/challenge', {}, agent);
      const proof = cryptoSign('sha256', rejoinProofInput(trustDomain, node, nonce, csrPem), { key: current.keyPem, dsaEncoding: 'ieee-p1363' }).toString('base64');
      return await post<Signed>(server, '/v1/agent/rejoin', { node, nonce, csr: csrPem, proof }, agent);
    });
  } finally {
    conn.retire();
  }
}

/**
 * Rejoins with an expired (or any) agent identity: signs a fresh server
 * nonce and the new CSR with the identity's key, which the control plane
 * recorded for this node. Talks to the server as an anonymous client over a
 * connection pinned to the identity's trust bundle.
 */
export async function rejoin(server: string, current: ServiceTls, trustDomain: string, node: string): Promise<AgentIdentity> {
  const id = agentId(trustDomain, node);
  const { keyPem, csrPem } = await createCsr(id);
  const s = await rejoinWith(server, current, trustDomain, node, csrPem);
  const roots = current.trustBundlePem;
  return { tls: material(checkLeaf(s, id, roots), keyPem, roots), trustDomain, registryAuth: s.registryAuth };
}

/** A client authenticated with the agent's own certificate. */
export class ControlClient implements CertSigner {
  private conn: Connection;
  private identity: ServiceTls;

  constructor(
    private readonly server: string,
    private readonly trustDomain: string,
    private readonly node: string,
    identity: ServiceTls,
    /** Told when the control plane hands out a (new) registry credential. */
    private readonly onRegistryAuth: (auth: string) => void = () => undefined,
  ) {
    this.identity = identity;
    this.conn = this.make(identity);
  }

  private make(t: ServiceTls): Connection {
    return new Connection({ ca: t.trustBundlePem, cert: t.certChainPem, key: t.keyPem, checkServerIdentity: checkServer(this.trustDomain) });
  }

  /** Switches to renewed agent material; requests in flight finish on the old connection, which then closes. */
  setIdentity(t: ServiceTls): void {
    const old = this.conn;
    this.identity = t;
    this.conn = this.make(t);
    old.retire();
  }

  private expired(): boolean {
    const leaf = splitPem(this.identity.certChainPem)[0];
    return !leaf || Date.parse(new X509Certificate(leaf).validTo) <= Date.now();
  }

  /**
   * Renews the agent's identity: with its certificate while it is valid,
   * else (a host that was off longer than its certificate) by rejoining
   * with its key. Returns the signed leaf; the key is the CSR's.
   */
  async renewAgent(csrPem: string): Promise<SignedLeaf> {
    const id = agentId(this.trustDomain, this.node);
    if (this.expired()) {
      const s = await rejoinWith(this.server, this.identity, this.trustDomain, this.node, csrPem);
      if (s.registryAuth) this.onRegistryAuth(s.registryAuth);
      return checkLeaf(s, id, this.identity.trustBundlePem);
    }
    const s = await this.conn.use((agent) => post<Signed>(this.server, '/v1/agent/renew', { csr: csrPem }, agent));
    if (s.registryAuth) this.onRegistryAuth(s.registryAuth);
    return checkLeaf(s, id, this.identity.trustBundlePem);
  }

  async signService(service: string, csrPem: string): Promise<SignedLeaf> {
    const s = await this.conn.use((agent) => post<Signed>(this.server, '/v1/agent/sign', { service, csr: csrPem }, agent));
    const leaf = splitPem(s.cert ?? '')[0];
    const uri = leaf ? certInfo(leaf).uris[0] : undefined;
    if (!uri) throw new KnitError('KNIT_ERR_CERT', `control plane returned no certificate for ${service}`);
    verifyChain(`certificate for ${service}`, s.cert, Array.isArray(s.chain) ? s.chain : [], this.identity.trustBundlePem);
    return { certPem: s.cert, chainPem: s.chain ?? [], notAfter: new Date(new X509Certificate(s.cert).validTo) };
  }

  /** The pinned roots: never a list a server merely sent. */
  async trustBundle(): Promise<string[]> {
    return this.identity.trustBundlePem;
  }

  /** Closes the connection once the exchanges in flight are done. */
  async close(): Promise<void> {
    this.conn.retire();
  }
}
