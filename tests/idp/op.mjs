// The OpenID provider of the auth tests: oidc-provider (a certified implementation) on 127.0.0.1.
//
//   OP_PORT   the port to listen on (required)
//   OP_KEYS   comma-separated files, each one private JWK (with its kid); the first signs
//   OP_ALG    the access tokens' algorithm (default RS256)
//
// Client `svc` (secret `svc-secret`) gets JWT access tokens (typ at+jwt) for the resource urn:umw:api
// through the client-credentials grant. Prints `ready <issuer>` once it listens.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.env.OP_PORT);
if (!port) {
  console.error('OP_PORT is required');
  process.exit(2);
}
const keys = (process.env.OP_KEYS || '').split(',').filter(Boolean).map((f) => JSON.parse(readFileSync(f, 'utf8')));
if (keys.length === 0) {
  console.error('OP_KEYS names no key file');
  process.exit(2);
}
const alg = process.env.OP_ALG || 'RS256';
const issuer = `http://127.0.0.1:${port}`;
const resource = 'urn:umw:api';

const provider = new Provider(issuer, {
  jwks: { keys },
  scopes: ['openid', 'offline_access', 'api:read'],
  ttl: { ClientCredentials: 300 },
  clients: [
    {
      client_id: 'svc',
      client_secret: 'svc-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'api:read',
    },
  ],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (indicator !== resource) throw new Error(`unknown resource ${indicator}`);
        return { scope: 'api:read', audience: resource, accessTokenTTL: 300, accessTokenFormat: 'jwt', jwt: { sign: { alg } } };
      },
    },
  },
  extraTokenClaims: () => ({ roles: ['reader'], tenant: 'acme' }),
  enabledJWA: { requestObjectSigningAlgValues: [], idTokenSigningAlgValues: [alg] },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const server = provider.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
