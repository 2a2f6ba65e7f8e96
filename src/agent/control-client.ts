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
 */
import { sign as cryptoSign, X509Certificate } from 'node:crypto';
import type { PeerCertificate } from 'node:tls';
import { Agent as Dispatcher, request } from 'undici';
import { KnitError } from '../errors.js';
import { agentId, type SpiffeId } from '../identity/spiffe.js';
import { certInfo, certInfoFromDer, splitPem } from '../identity/x509.js';
import { createCsr, validateLeaf, type SignedLeaf } from '../identity/ca.js';
import { verifyChain } from '../identity/chain.js';
import type { ServiceTls } from '../proxy/tls.js';
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

/** POSTs JSON; maps transport failures to KNIT_ERR_SERVER_UNAVAILABLE and error answers to their code. */
async function post<T>(server: string, path: string, body: unknown, dispatcher: Dispatcher): Promise<T> {
  let res;
  try {
    res = await request(`${server}${path}`, {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'content-type': 'application/json' },
      dispatcher,
      signal: AbortSignal.timeout(15_000),
    });
  } catch (e) {
    const raw = (e as { code?: unknown }).code ?? (e as { cause?: { code?: unknown } }).cause?.code;
    const code = typeof raw === 'string' ? raw : '';
    if (/CERT|SELF_SIGNED|UNABLE_TO_|ALTNAME/.test(code)) {
      // Not a passing fault: the server is not the one the pinned root vouches for. Nothing was sent.
      throw new KnitError('KNIT_ERR_UNAUTHORIZED', `the control plane at ${server} presented a certificate that does not chain to the pinned trust root or is not a control-plane identity (${code}: ${(e as Error).message}); refusing to talk to it`, { cause: e });
    }
    throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', `control plane ${server} unreachable: ${(e as Error).message}`, { cause: e });
  }
  const json = (await res.body.json().catch(() => ({}))) as T & { error?: string; code?: string };
  if (res.statusCode >= 400) {
    const code = json.code === 'KNIT_ERR_UNAUTHORIZED' || json.code === 'KNIT_ERR_BAD_REQUEST' || json.code === 'KNIT_ERR_CA' ? json.code : 'KNIT_ERR_SERVER_UNAVAILABLE';
    throw new KnitError(code, `control plane ${path}: ${json.error ?? `HTTP ${res.statusCode}`}`);
  }
  return json;
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
  const insecure = new Dispatcher({ connect: { rejectUnauthorized: false } });
  let got: { roots?: unknown };
  try {
    const res = await request(`${server}/v1/ca/roots`, { dispatcher: insecure, signal: AbortSignal.timeout(15_000) });
    got = (await res.body.json()) as { roots?: unknown };
  } catch (e) {
    throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', `control plane ${server} unreachable: ${(e as Error).message}`, { cause: e });
  } finally {
    await insecure.close();
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
  const d = new Dispatcher({ connect: { ca: roots, checkServerIdentity: checkServer(trustDomain) } });
  try {
    const s = await post<Signed>(server, '/v1/agent/enrol', { token: token.trim(), csr: csrPem }, d);
    return { tls: material(checkLeaf(s, id, roots), keyPem, roots), trustDomain, registryAuth: s.registryAuth };
  } finally {
    await d.close();
  }
}

/** Asks for a nonce and sends the rejoin proof for `csrPem`, signed with `current`'s key. */
async function rejoinWith(server: string, current: ServiceTls, trustDomain: string, node: string, csrPem: string): Promise<Signed> {
  const d = new Dispatcher({ connect: { ca: current.trustBundlePem, checkServerIdentity: checkServer(trustDomain) } });
  try {
    const { nonce } = await post<{ nonce: string }>(server, '/v1/agent/challenge', {}, d);
    const proof = cryptoSign('sha256', rejoinProofInput(trustDomain, node, nonce, csrPem), { key: current.keyPem, dsaEncoding: 'ieee-p1363' }).toString('base64');
    return await post<Signed>(server, '/v1/agent/rejoin', { node, nonce, csr: csrPem, proof }, d);
  } finally {
    await d.close();
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
  private dispatcher: Dispatcher;
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
    this.dispatcher = this.make(identity);
  }

  private make(t: ServiceTls): Dispatcher {
    return new Dispatcher({ connect: { ca: t.trustBundlePem, cert: t.certChainPem, key: t.keyPem, checkServerIdentity: checkServer(this.trustDomain) } });
  }

  /** Switches to renewed agent material; requests in flight finish on the old connection. */
  setIdentity(t: ServiceTls): void {
    const old = this.dispatcher;
    this.identity = t;
    this.dispatcher = this.make(t);
    void old.close();
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
    const s = await post<Signed>(this.server, '/v1/agent/renew', { csr: csrPem }, this.dispatcher);
    if (s.registryAuth) this.onRegistryAuth(s.registryAuth);
    return checkLeaf(s, id, this.identity.trustBundlePem);
  }

  async signService(service: string, csrPem: string): Promise<SignedLeaf> {
    const s = await post<Signed>(this.server, '/v1/agent/sign', { service, csr: csrPem }, this.dispatcher);
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

  async close(): Promise<void> {
    await this.dispatcher.close();
  }
}
