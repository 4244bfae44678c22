// Test authorization server for token-sidecar's integration tests: the real `oidc-provider`
// (see package.json for the pinned version) configured for the OAuth2 `client_credentials` grant
// with `private_key_jwt` client authentication (RFC 7523) and resource indicators (RFC 8707).
//
// Usage: node server.mjs CONFIG.json
//
//   {
//     "clients": [ { "client_id": "orders-service",
//                    "jwks": { "keys": [ ...public JWKs... ] },
//                    "scope": "orders:read orders:write",
//                    "token_endpoint_auth_signing_alg": "ES256" } ],   // optional
//     "resources": { "https://orders.example.com": { "scope": "orders:read orders:write", "ttl": 300 } },
//     "default_ttl": 300
//   }
//
// mTLS (RFC 8705), optional: with `"tls": { "cert": PEM, "key": PEM, "client_ca": PEM }` the
// server speaks HTTPS (the issuer is https://127.0.0.1:PORT), asks every client for a
// certificate (verified against `client_ca`, but not required at the TLS layer, so a missing
// one is an OAuth error, not a handshake failure) and enables oidc-provider's mTLS feature:
// `tls_client_auth`, `self_signed_tls_client_auth` and certificate-bound access tokens (`cnf`
// with `x5t#S256` in JWT access tokens). A client entry may then carry
//   "metadata": { "token_endpoint_auth_method": "tls_client_auth",
//                 "tls_client_auth_subject_dn": "CN=...",
//                 "tls_client_certificate_bound_access_tokens": true }
// and, for `self_signed_tls_client_auth`, "self_signed_cert": PEM (registered as a JWK with x5c).
//
// Listens on 127.0.0.1 on an ephemeral port, prints exactly one line
// `LISTENING http://127.0.0.1:PORT` to stdout when ready (the issuer is that URL), and exits when
// its stdin closes (so it never outlives the test process that holds the pipe) or on SIGTERM.
//
// Endpoints: POST /oauth2/token, GET /jwks, GET /.well-known/openid-configuration, and
// GET /__test/stats -> {"token_requests": N} (every POST to /oauth2/token, counted on arrival).
//
// A Hydra/Auth0-style `audience` form parameter (space-separated, may repeat) is turned into one
// RFC 8707 `resource` parameter per audience before oidc-provider sees the request, unless the
// request already carries `resource`. For a configured resource the access token is an RFC 9068
// JWT (RS256) with `aud` = the resource, `scope` = the granted scopes and a lifetime of the
// resource's `ttl`; without a resource the token is opaque and lives `default_ttl` seconds.
// Requested scopes must all be in the client's `scope` and, with a resource, in the resource's
// `scope` (else 400 invalid_scope); an unknown resource is 400 invalid_target.
//
// Quiet by design: stdout carries only the LISTENING line and everything oidc-provider prints goes
// to stderr (minus its known, expected start-up warnings). Set DEBUG=oidc-provider:* to see why
// a request was refused (e.g. the real reason behind a generic `invalid_client`).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';

// oidc-provider writes notices with console.info (stdout) and warnings with console.warn. Keep
// stdout for the LISTENING line only; drop the warnings this test setup expects.
const EXPECTED_WARNINGS = [
  'Unsupported runtime', // Node 20 works; oidc-provider 9 asks for >= 22
  'in-memory adapter', // fine for a throwaway test server
  'already parsed request body', // our audience -> resource middleware hands over the body
];
const toStderr = (...args) => {
  const line = args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' ');
  if (EXPECTED_WARNINGS.some((w) => line.includes(w))) return;
  process.stderr.write(`${line}\n`);
};
console.log = toStderr;
console.info = toStderr;
console.warn = toStderr;
console.debug = toStderr;

const TOKEN_PATH = '/oauth2/token';
const STATS_PATH = '/__test/stats';
const BODY_LIMIT = 56 * 1024; // oidc-provider's own limit for form bodies

function fail(message) {
  process.stderr.write(`authz server: ${message}\n`);
  process.exit(1);
}

// --- config -------------------------------------------------------------------------------

const configPath = process.argv[2];
if (!configPath) fail('usage: node server.mjs CONFIG.json');
let config;
try {
  config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
} catch (err) {
  fail(`cannot read config ${configPath}: ${err.message}`);
}

const splitScope = (s) => (typeof s === 'string' ? s.split(/\s+/).filter(Boolean) : []);

const clients = config.clients ?? [];
const resources = config.resources ?? {};
const defaultTtl = config.default_ttl ?? 300;
if (!Array.isArray(clients) || clients.length === 0) fail('config: "clients" must be a non-empty array');
for (const [id, rs] of Object.entries(resources)) {
  if (!Number.isSafeInteger(rs.ttl) || rs.ttl <= 0) fail(`config: resources["${id}"].ttl must be a positive integer`);
  if (typeof rs.scope !== 'string') fail(`config: resources["${id}"].scope must be a string`);
}
if (!Number.isSafeInteger(defaultTtl) || defaultTtl <= 0) fail('config: "default_ttl" must be a positive integer');

// oidc-provider only treats scopes it knows (its `scopes` setting) as grantable: collect every
// scope named anywhere in the config.
const allScopes = new Set([
  ...clients.flatMap((c) => splitScope(c.scope)),
  ...Object.values(resources).flatMap((r) => splitScope(r.scope)),
]);

// --- provider -----------------------------------------------------------------------------

const { default: Provider, errors } = await import('oidc-provider');

let tokenRequests = 0;

// --- mTLS (optional) ------------------------------------------------------------------------

const tls = config.tls;
const server = tls
  ? https.createServer({
    cert: tls.cert,
    key: tls.key,
    ca: tls.client_ca,
    requestCert: true,
    // Verified, not required: oidc-provider decides (certificateAuthorized below).
    rejectUnauthorized: false,
  })
  : http.createServer();
server.on('clientError', (_err, socket) => socket.destroy());
server.on('tlsClientError', (_err, socket) => socket.destroy());
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}`;

// The certificate the client presented on this connection, if any.
function peerCertificate(ctx) {
  const peer = ctx.socket?.getPeerCertificate?.();
  return peer && peer.raw ? new crypto.X509Certificate(peer.raw) : undefined;
}

// A self-signed certificate registered the RFC 8705 §2.2 way: its public key as a JWK with x5c.
function selfSignedJwks(pem) {
  const cert = new crypto.X509Certificate(pem);
  return { keys: [{ ...cert.publicKey.export({ format: 'jwk' }), x5c: [cert.raw.toString('base64')] }] };
}

const mtlsFeature = tls
  ? {
    enabled: true,
    certificateBoundAccessTokens: true,
    tlsClientAuth: true,
    selfSignedTlsClientAuth: true,
    getCertificate: peerCertificate,
    certificateAuthorized: (ctx) => ctx.socket?.authorized === true,
    // Node writes a subject as one RDN per line ("CN=a\nO=b"); registrations use RFC 4514 commas.
    certificateSubjectMatches(ctx, property, expected) {
      const cert = peerCertificate(ctx);
      if (!cert || property !== 'tls_client_auth_subject_dn') return false;
      return cert.subject.split('\n').join(',') === expected;
    },
  }
  : { enabled: false };

// The provider's signing key, made fresh for every run.
const signingJwk = {
  ...crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }),
  kid: `authz-${crypto.randomBytes(8).toString('hex')}`,
  alg: 'RS256',
  use: 'sig',
};

// Every requested scope must be allowed for the client (and for the resource, when there is one).
function checkScopes(ctx, client, resourceScope) {
  const clientScopes = new Set(splitScope(client.scope));
  const resourceScopes = resourceScope === undefined ? undefined : new Set(splitScope(resourceScope));
  for (const scope of splitScope(ctx.oidc.params.scope)) {
    if (!clientScopes.has(scope)) {
      throw new errors.InvalidScope('requested scope is not allowed for this client', scope);
    }
    if (resourceScopes && !resourceScopes.has(scope)) {
      throw new errors.InvalidScope('requested scope is not allowed for the requested resource', scope);
    }
  }
}

const provider = new Provider(issuer, {
  clients: clients.map((c) => ({
    client_id: c.client_id,
    jwks: c.self_signed_cert ? selfSignedJwks(c.self_signed_cert) : c.jwks,
    scope: c.scope ?? '',
    token_endpoint_auth_method: 'private_key_jwt',
    ...(c.token_endpoint_auth_signing_alg
      ? { token_endpoint_auth_signing_alg: c.token_endpoint_auth_signing_alg }
      : {}),
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    ...(c.metadata ?? {}),
  })),
  clientAuthMethods: tls
    ? ['private_key_jwt', 'tls_client_auth', 'self_signed_tls_client_auth']
    : ['private_key_jwt'],
  enabledJWA: {
    clientAuthSigningAlgValues: [
      'RS256', 'RS384', 'RS512',
      'PS256', 'PS384', 'PS512',
      'ES256', 'ES384', 'ES512',
      'EdDSA', 'Ed25519',
    ],
  },
  jwks: { keys: [signingJwk] },
  scopes: [...allScopes],
  claims: { openid: ['sub'] },
  routes: { token: TOKEN_PATH, jwks: '/jwks' },
  responseTypes: ['none'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    mTLS: mtlsFeature,
    resourceIndicators: {
      enabled: true,
      // No resource requested: no default, an opaque token limited to the client's scopes.
      async defaultResource(ctx, client) {
        checkScopes(ctx, client);
        return undefined;
      },
      async useGrantedResource() {
        return false;
      },
      async getResourceServerInfo(ctx, resourceIndicator, client) {
        // oidc-provider refuses more than one resource for client_credentials, but only after
        // looking each one up; say so first rather than fail a per-resource scope check.
        if (new Set([ctx.oidc.params.resource ?? []].flat()).size > 1) {
          throw new errors.InvalidTarget('only a single resource indicator value is supported for this grant type');
        }
        const rs = Object.hasOwn(resources, resourceIndicator) ? resources[resourceIndicator] : undefined;
        if (!rs) {
          throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
        }
        checkScopes(ctx, client, rs.scope);
        return {
          audience: resourceIndicator,
          scope: rs.scope,
          accessTokenTTL: rs.ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: {
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL || defaultTtl,
  },
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

provider.on('server_error', (_ctx, err) => {
  process.stderr.write(`authz server: server_error: ${err?.stack ?? err}\n`);
});

async function readBody(req) {
  const chunks = [];
  let received = 0;
  for await (const chunk of req) {
    received += chunk.length;
    if (received > BODY_LIMIT) throw new errors.InvalidRequest('request entity too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, received).toString('utf8');
}

// Runs before oidc-provider's own routing.
provider.use(async (ctx, next) => {
  if (ctx.path === STATS_PATH && ctx.method === 'GET') {
    ctx.set('Cache-Control', 'no-store');
    ctx.body = { token_requests: tokenRequests };
    return;
  }

  if (ctx.path === TOKEN_PATH && ctx.method === 'POST') {
    tokenRequests += 1;

    if (ctx.is('application/x-www-form-urlencoded')) {
      let raw;
      try {
        raw = await readBody(ctx.req);
      } catch (err) {
        ctx.status = 400;
        ctx.body = { error: 'invalid_request', error_description: `failed to read the request body: ${err.message}` };
        return;
      }
      const form = new URLSearchParams(raw);
      if (form.has('audience') && !form.has('resource')) {
        const audiences = [...new Set(form.getAll('audience').flatMap(splitScope))];
        form.delete('audience');
        for (const aud of audiences) form.append('resource', aud);
        raw = form.toString();
      }
      // The request stream is consumed; oidc-provider reads an already-read body from here.
      ctx.request.body = raw;
    }
  }

  await next();
});

server.on('request', provider.callback());

// --- lifetime -----------------------------------------------------------------------------

const exit = () => {
  server.closeAllConnections?.();
  process.exit(0);
};
process.on('SIGTERM', exit);
process.on('SIGINT', exit);
process.stdin.on('end', exit);
process.stdin.on('close', exit);
process.stdin.on('error', exit);
process.stdin.resume();

process.stdout.write(`LISTENING ${issuer}\n`);
