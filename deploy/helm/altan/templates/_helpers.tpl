{{/*
Names, labels and shared pieces of the altan chart. Component templates pass a dict:
  (dict "ctx" $ "component" "agent")
where "ctx" is the root context and "component" one of gateway, agent, tool, integrator (or tool-<name> for a
tool container).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "altan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every resource name. Kept to 40 characters so that "<fullname>-integrator" and
"<fullname>-tool-<container>" stay valid DNS labels (63).
*/}}
{{- define "altan.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects (Deployment, Service, ServiceAccount, HPA, PDB, NetworkPolicy). */}}
{{- define "altan.componentName" -}}
{{- printf "%s-%s" (include "altan.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "altan.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "altan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: altan
{{- end -}}

{{/* Labels that select one component's pods; never change them on upgrade (selectors are immutable). */}}
{{- define "altan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "altan.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's objects and pods. */}}
{{- define "altan.componentLabels" -}}
{{ include "altan.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The Secret holding ALTAN_JWT_SECRET, ALTAN_MASTER_KEY, REDIS_URL and the bootstrap secrets. */}}
{{- define "altan.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- printf "%s-secrets" (include "altan.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* "host:port" of a component's Service inside the release namespace. */}}
{{- define "altan.serviceAddr" -}}
{{- printf "dns:///%s.%s.svc:%v" (include "altan.componentName" .) .ctx.Release.Namespace .port -}}
{{- end -}}

{{/* The image reference of a service: (dict "ctx" $ "image" .Values.agent.image). */}}
{{- define "altan.image" -}}
{{- $ctx := .ctx -}}
{{- $tag := toString (.image.tag | default $ctx.Values.image.tag | default $ctx.Chart.AppVersion) -}}
{{- if eq (lower $tag) "latest" -}}
{{- fail (printf "image tag of %s must not be \"latest\": pin a version (default: the chart's appVersion)" .image.repository) -}}
{{- end -}}
{{- $repository := .image.repository -}}
{{- if $ctx.Values.image.registry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" $ctx.Values.image.registry) $repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" $repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}
{{- end -}}

{{/* A tool container's image: a full reference pinned by tag or digest, never "latest". */}}
{{- define "altan.toolContainerImage" -}}
{{- $image := toString .image -}}
{{- $last := last (splitList "/" $image) -}}
{{- if not (or (contains "@" $last) (contains ":" $last)) -}}
{{- fail (printf "toolContainers[%s].image %q has no tag: pin a version or a digest" .name $image) -}}
{{- end -}}
{{- if and (not (contains "@" $last)) (eq (lower (last (splitList ":" $last))) "latest") -}}
{{- fail (printf "toolContainers[%s].image %q must not use the tag \"latest\"" .name $image) -}}
{{- end -}}
{{- $image -}}
{{- end -}}

{{/*
Does a component use Redis? The stateful services always when it is configured; the gateway only to share a limit
on each tenant's request rate among its replicas. Takes (dict "ctx" $ "component" "agent"); prints "true" or nothing.
*/}}
{{- define "altan.usesRedis" -}}
{{- $v := .ctx.Values -}}
{{- if include "altan.redisEnabled" .ctx -}}
{{- if or (has .component (list "agent" "tool" "integrator")) (and (eq .component "gateway") (gt (float64 $v.gateway.tenantRateLimit.requestsPerSecond) 0.0)) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* Is Redis (REDIS_URL) configured? Prints "true" or nothing. */}}
{{- define "altan.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.urlInExistingSecret -}}true{{- end -}}
{{- end -}}

{{/* Does a JWKS (URL or inline) verify tokens? Prints "true" or nothing. */}}
{{- define "altan.jwksEnabled" -}}
{{- if or .Values.config.jwt.jwksUrl .Values.config.jwt.jwks -}}true{{- end -}}
{{- end -}}

{{/*
Guards: values that render but cannot work. Included by the ConfigMap, which every install renders.
*/}}
{{- define "altan.validateValues" -}}
{{- $v := .Values -}}
{{- if not (or $v.secrets.jwtSecret $v.secrets.existingSecret (include "altan.jwksEnabled" .)) -}}
{{- fail "no JWT key configured: set secrets.jwtSecret (HS256), config.jwt.jwksUrl or config.jwt.jwks, or secrets.existingSecret holding ALTAN_JWT_SECRET" -}}
{{- end -}}
{{- if and $v.secrets.jwtSecret (lt (len $v.secrets.jwtSecret) 32) -}}
{{- fail "secrets.jwtSecret must be at least 32 bytes (the services refuse a shorter ALTAN_JWT_SECRET): openssl rand -base64 32" -}}
{{- end -}}
{{- if and $v.secrets.jwtSecret (include "altan.jwksEnabled" .) -}}
{{- fail "set either secrets.jwtSecret (HS256) or a JWKS (config.jwt.jwksUrl / config.jwt.jwks), not both: HS* and asymmetric algorithms must not be mixed" -}}
{{- end -}}
{{- if and $v.config.jwt.jwksUrl $v.config.jwt.jwks -}}
{{- fail "set config.jwt.jwksUrl or config.jwt.jwks, not both" -}}
{{- end -}}
{{- if not (or $v.secrets.masterKey $v.secrets.existingSecret) -}}
{{- fail "secrets.masterKey is required (openssl rand -base64 32), or secrets.existingSecret holding ALTAN_MASTER_KEY: a generated key would differ per pod and be lost on restart" -}}
{{- end -}}
{{- if and $v.secrets.existingSecret (or $v.secrets.jwtSecret $v.secrets.masterKey $v.secrets.bootstrap $v.redis.url) -}}
{{- fail "secrets.existingSecret is set: put ALTAN_JWT_SECRET, ALTAN_MASTER_KEY, REDIS_URL and the bootstrap secrets into that Secret instead of secrets.jwtSecret, secrets.masterKey, secrets.bootstrap or redis.url" -}}
{{- end -}}
{{- if and $v.secrets.bootstrapKeys (not $v.secrets.existingSecret) -}}
{{- fail "secrets.bootstrapKeys only applies with secrets.existingSecret; use secrets.bootstrap otherwise" -}}
{{- end -}}
{{- if and $v.redis.urlInExistingSecret (not $v.secrets.existingSecret) -}}
{{- fail "redis.urlInExistingSecret needs secrets.existingSecret" -}}
{{- end -}}
{{- if and (include "altan.redisEnabled" .) (not $v.redis.cidrs) -}}
{{- fail "Redis is configured but redis.cidrs is empty: the NetworkPolicies would block it (e.g. redis.cidrs={10.0.0.3/32})" -}}
{{- end -}}
{{- range $component := list "agent" "tool" "integrator" -}}
{{- $c := index $v $component -}}
{{- if and (not (include "altan.redisEnabled" $)) (or $c.autoscaling.enabled (gt (int $c.replicas) 1)) -}}
{{- fail (printf "%s: without Redis (redis.url) state lives in each pod, so it must run one replica: set %s.autoscaling.enabled=false and %s.replicas=1, or configure Redis" $component $component $component) -}}
{{- end -}}
{{- end -}}
{{- range $component := list "gateway" "agent" "tool" "integrator" -}}
{{- $a := (index $v $component).autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is greater than maxReplicas (%v)" $component $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- if eq $v.agent.workQueue.type "cloud-tasks" -}}
{{- $ct := $v.agent.workQueue.cloudTasks -}}
{{- if not (and $ct.queue $ct.pushUrl $ct.serviceAccount) -}}
{{- fail "agent.workQueue.type=cloud-tasks needs agent.workQueue.cloudTasks.queue, .pushUrl and .serviceAccount" -}}
{{- end -}}
{{- if not (include "altan.redisEnabled" $) -}}
{{- fail "agent.workQueue.type=cloud-tasks needs Redis (redis.url): every agent replica must read every task" -}}
{{- end -}}
{{- if not $v.agent.serviceAccount.gcpServiceAccount -}}
{{- fail "agent.workQueue.type=cloud-tasks needs agent.serviceAccount.gcpServiceAccount (Workload Identity: the agent creates the tasks as that Google service account)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.agent.autoscaling.queueLength.enabled (not $v.agent.autoscaling.enabled) -}}
{{- fail "agent.autoscaling.queueLength needs agent.autoscaling.enabled" -}}
{{- end -}}
{{- if and $v.tool.discovery.enabled (not $v.networkPolicy.kubeApiServer.cidrs) -}}
{{- fail "tool.discovery.enabled needs networkPolicy.kubeApiServer.cidrs (the addresses from `kubectl get endpoints kubernetes -n default`), or set tool.discovery.enabled=false" -}}
{{- end -}}
{{- range $component := list "agent" "tool" "integrator" -}}
{{- $c := index $v $component -}}
{{- if and $c.metrics.port (eq (int $c.metrics.port) (int $c.port)) -}}
{{- fail (printf "%s.metrics.port (%v) must differ from %s.port, the gRPC port" $component $c.metrics.port $component) -}}
{{- end -}}
{{- end -}}
{{- range $i, $peer := $v.networkPolicy.metrics.from -}}
{{- with include "altan.peerProblem" $peer -}}
{{- fail (printf "networkPolicy.metrics.from[%d] %s" $i .) -}}
{{- end -}}
{{- end -}}
{{- range $extra := list (list "integrator.llmEgress" $v.integrator.llmEgress) (list "telemetry.otlp.egress" $v.telemetry.otlp.egress) -}}
{{- range $i, $rule := index $extra 1 -}}
{{- $where := printf "%s[%d]" (index $extra 0) $i -}}
{{- if not (kindIs "map" $rule) -}}
{{- fail (printf "%s must be {cidr, ports} or {to, ports}" $where) -}}
{{- end -}}
{{- if eq (empty $rule.cidr) (empty $rule.to) -}}
{{- fail (printf "%s needs either cidr or to (NetworkPolicy peers), not both: without them the rule would reach every address" $where) -}}
{{- end -}}
{{- if empty $rule.ports -}}
{{- fail (printf "%s needs ports: without them the rule would open every port" $where) -}}
{{- end -}}
{{- with $rule.cidr -}}
{{- with include "altan.peerProblem" (dict "ipBlock" (dict "cidr" .)) -}}
{{- fail (printf "%s.cidr %s" $where .) -}}
{{- end -}}
{{- end -}}
{{- range $j, $peer := $rule.to -}}
{{- with include "altan.peerProblem" $peer -}}
{{- fail (printf "%s.to[%d] %s" $where $j .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $v.telemetry.otlp.endpoint -}}
{{- $host := (urlParse .).hostname -}}
{{- if and (not $v.telemetry.otlp.egress) (not (has $host (list "localhost" "127.0.0.1" "::1"))) -}}
{{- fail (printf "telemetry.otlp.endpoint (%s) needs telemetry.otlp.egress (the collector's pods or addresses, and port): the NetworkPolicies would drop every span" .) -}}
{{- end -}}
{{- end -}}
{{- if and $v.tls.enabled $v.mesh.istio.enabled -}}
{{- fail "set tls.enabled or mesh.istio.enabled, not both: inside an Istio mesh the sidecars do mTLS and the services speak plaintext" -}}
{{- end -}}
{{- if $v.tls.enabled -}}
{{- range $component := list "agent" "tool" "integrator" -}}
{{- $c := index $v $component -}}
{{- if or (eq (int $v.tls.healthPort) (int $c.port)) (eq (int $v.tls.healthPort) (int (dig "metrics" "port" 0 $c))) -}}
{{- fail (printf "tls.healthPort (%v) must differ from the ports of %s" $v.tls.healthPort $component) -}}
{{- end -}}
{{- end -}}
{{- with $v.tls.issuerRef -}}
{{- if not .name -}}
{{- fail "tls.issuerRef needs a name (or leave it empty for the install's own CA)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (or $v.monitoring.serviceMonitor.enabled $v.monitoring.podMonitoring.enabled) (not $v.networkPolicy.metrics.from) -}}
{{- fail "monitoring.serviceMonitor / monitoring.podMonitoring need networkPolicy.metrics.from (the scrapers' pods, e.g. GKE's collectors in namespace gmp-system): the NetworkPolicies would block every scrape" -}}
{{- end -}}
{{- if and $v.toolContainers (not $v.tool.discovery.enabled) -}}
{{- fail "toolContainers need tool.discovery.enabled: the tool service finds them by their Services' label (and then networkPolicy.kubeApiServer.cidrs)" -}}
{{- end -}}
{{- $names := dict -}}
{{- range $tc := $v.toolContainers -}}
{{- if hasKey $names $tc.name -}}
{{- fail (printf "toolContainers: the name %q is used twice" $tc.name) -}}
{{- end -}}
{{- $_ := set $names $tc.name true -}}
{{- end -}}
{{- end -}}

{{/*
Why a NetworkPolicy peer from the values cannot be used, or nothing: it must name an ipBlock or selectors (an empty
peer list would admit everyone), and admit neither every address (/0) nor every pod of every namespace.
*/}}
{{- define "altan.peerProblem" -}}
{{- if not (kindIs "map" .) -}}
is not a NetworkPolicy peer (ipBlock, namespaceSelector, podSelector)
{{- else if hasKey . "ipBlock" -}}
{{- $cidr := toString (dig "cidr" "" (.ipBlock | default dict)) -}}
{{- if or (hasKey . "namespaceSelector") (hasKey . "podSelector") -}}
combines ipBlock with a selector, which Kubernetes refuses
{{- else if not $cidr -}}
has an ipBlock without a cidr
{{- else if hasSuffix "/0" $cidr -}}
admits every address ({{ $cidr }}): name the addresses
{{- end -}}
{{- else if hasKey . "namespaceSelector" -}}
{{- $ns := .namespaceSelector | default dict -}}
{{- $pods := .podSelector | default dict -}}
{{- if not (or $ns.matchLabels $ns.matchExpressions $pods.matchLabels $pods.matchExpressions) -}}
admits every pod of every namespace: give the namespaceSelector or the podSelector labels
{{- end -}}
{{- else if not (hasKey . "podSelector") -}}
names no ipBlock, namespaceSelector or podSelector
{{- end -}}
{{- end -}}

{{/* Pod-level security context: Pod Security Standards "restricted". */}}
{{- define "altan.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Container-level security context: Pod Security Standards "restricted", read-only root filesystem. */}}
{{- define "altan.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Scheduling fields of a component: (dict "ctx" $ "component" "agent"). */}}
{{- define "altan.scheduling" -}}
{{- $c := index .ctx.Values .component -}}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Pod annotations that roll the pods when the rendered configuration or Secret changes (helm upgrade after a
rotation). An existing Secret is not seen by the chart: roll with `kubectl rollout restart` after changing it.
*/}}
{{- define "altan.podAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
{{- if not .ctx.Values.secrets.existingSecret }}
checksum/secret: {{ include (print .ctx.Template.BasePath "/secret.yaml") .ctx | sha256sum }}
{{- end }}
{{- with (index .ctx.Values .component).podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Environment every service container gets: the ConfigMap and the JWT secret. */}}
{{- define "altan.commonEnvFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "altan.fullname" . }}-config
{{- end -}}

{{/*
Environment from the Secret that a component needs, by secretKeyRef (never envFrom, so that each service sees only
its own keys): ALTAN_JWT_SECRET for every service unless a JWKS verifies tokens, REDIS_URL where altan.usesRedis says,
ALTAN_MASTER_KEY and the bootstrap secrets for the integrator, and ALTAN_INTERNAL_KEY (_internal-key.tpl, its own
Secret) for all but the gateway. Takes (dict "ctx" $ "component" "agent").
*/}}
{{- define "altan.secretEnv" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $secret := include "altan.secretName" $ctx -}}
{{- $env := list -}}
{{- if or $v.secrets.jwtSecret $v.secrets.existingSecret -}}
{{- /* An existing Secret may lack the key when a JWKS verifies tokens instead. */ -}}
{{- $optional := and $v.secrets.existingSecret (include "altan.jwksEnabled" $ctx) | empty | not -}}
{{- $env = append $env (dict "name" "ALTAN_JWT_SECRET" "optional" $optional) -}}
{{- end -}}
{{- if include "altan.usesRedis" . -}}
{{- $env = append $env (dict "name" "REDIS_URL" "optional" false) -}}
{{- end -}}
{{- if eq .component "integrator" -}}
{{- $env = append $env (dict "name" "ALTAN_MASTER_KEY" "optional" false) -}}
{{- range $name := concat (keys $v.secrets.bootstrap | sortAlpha) $v.secrets.bootstrapKeys -}}
{{- $env = append $env (dict "name" $name "optional" false) -}}
{{- end -}}
{{- end -}}
{{- range $env }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .name }}
      optional: {{ .optional }}
{{- end -}}
{{- if ne .component "gateway" }}
{{ include "altan.internalKeyEnv" $ctx }}
{{- end -}}
{{- end -}}

{{/*
Volume mounts every service container has: a writable /tmp, the JWKS file when configured, and the CA of a TLS Redis
for the services that use Redis. Takes (dict "ctx" $ "component" "agent").
*/}}
{{- define "altan.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.config.jwt.jwks }}
- name: jwks
  mountPath: /etc/altan/jwks
  readOnly: true
{{- end }}
{{- if and .ctx.Values.redis.caCert (include "altan.usesRedis" .) }}
- name: redis-ca
  mountPath: /etc/altan/redis-ca
  readOnly: true
{{- end }}
{{- if include "altan.usesTls" . }}
- name: tls
  mountPath: /etc/altan/tls
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The volumes behind altan.commonVolumeMounts. */}}
{{- define "altan.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .ctx.Values.config.jwt.jwks }}
- name: jwks
  configMap:
    name: {{ include "altan.fullname" .ctx }}-jwks
{{- end }}
{{- if and .ctx.Values.redis.caCert (include "altan.usesRedis" .) }}
- name: redis-ca
  configMap:
    name: {{ include "altan.fullname" .ctx }}-redis-ca
{{- end }}
{{- if include "altan.usesTls" . }}
# The certificate cert-manager keeps renewed; the service reads the new files without a restart.
- name: tls
  secret:
    secretName: {{ include "altan.tlsSecretName" . }}
    defaultMode: 0440
{{- end -}}
{{- end -}}

{{/* gRPC probes of a service listening on a port. */}}
{{- define "altan.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ . }}
  periodSeconds: 2
  failureThreshold: 30
livenessProbe:
  grpc:
    port: {{ . }}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ . }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/* NetworkPolicy egress rule to the cluster DNS (UDP and TCP 53). */}}
{{- define "altan.dnsEgressRule" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Values.networkPolicy.dns.namespace }}
      {{- with .Values.networkPolicy.dns.podLabels }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end -}}

{{/* NetworkPolicy egress rule to Redis, when configured. */}}
{{- define "altan.redisEgressRule" -}}
{{- if include "altan.redisEnabled" . }}
- to:
    {{- range .Values.redis.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    - protocol: TCP
      port: {{ .Values.redis.port }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rule to the public internet on one port, private and metadata ranges excluded. */}}
{{- define "altan.internetEgressRule" -}}
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
        except:
          {{- toYaml .Values.networkPolicy.internet.except | nindent 10 }}
  ports:
    - protocol: TCP
      port: {{ .Values.networkPolicy.internet.port }}
{{- end -}}

{{/* NetworkPolicy peer: the pods of one component. */}}
{{- define "altan.componentPeer" -}}
- podSelector:
    matchLabels:
      {{- include "altan.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/*
Who calls whom over the internal ports: the NetworkPolicies' graph, which mTLS (tls.enabled) and Istio's
AuthorizationPolicies (mesh.istio.enabled) enforce again with identities. Keep the three in step.
*/}}
{{- define "altan.callers" -}}
agent: [gateway]
tool: [gateway, integrator]
integrator: [gateway, agent]
{{- end -}}

{{/* Does a component speak mTLS (tls.enabled, one of the four services)? Takes (dict "ctx" $ "component" "agent"). */}}
{{- define "altan.usesTls" -}}
{{- if and .ctx.Values.tls.enabled (has .component (list "gateway" "agent" "tool" "integrator")) -}}true{{- end -}}
{{- end -}}

{{/* The identity in a component's certificate, which its callees admit: "<fullname>-agent.<namespace>.svc". */}}
{{- define "altan.tlsIdentity" -}}
{{- printf "%s.%s.svc" (include "altan.componentName" .) .ctx.Release.Namespace -}}
{{- end -}}

{{/* The Secret cert-manager writes a component's certificate into. */}}
{{- define "altan.tlsSecretName" -}}
{{- printf "%s-tls" (include "altan.componentName" .) -}}
{{- end -}}

{{/* Environment of mTLS: the certificate files, the callers admitted and the plaintext health port. */}}
{{- define "altan.tlsEnv" -}}
{{- if include "altan.usesTls" . }}
- name: ALTAN_TLS_CERT_FILE
  value: /etc/altan/tls/tls.crt
- name: ALTAN_TLS_KEY_FILE
  value: /etc/altan/tls/tls.key
- name: ALTAN_TLS_CA_FILE
  value: /etc/altan/tls/ca.crt
{{- $ctx := .ctx }}
{{- with index (include "altan.callers" . | fromYaml) .component }}
- name: ALTAN_TLS_ALLOWED_CLIENTS
  value: {{ include "altan.tlsIdentities" (dict "ctx" $ctx "components" .) | quote }}
- name: ALTAN_HEALTH_PORT
  value: {{ $ctx.Values.tls.healthPort | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The identities of a list of components, comma-separated: (dict "ctx" $ "components" (list "gateway")). */}}
{{- define "altan.tlsIdentities" -}}
{{- $ctx := .ctx -}}
{{- $names := list -}}
{{- range .components -}}
{{- $names = append $names (include "altan.tlsIdentity" (dict "ctx" $ctx "component" .)) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* The gRPC port a service's probes ask: its own, or with mTLS the plaintext health port. */}}
{{- define "altan.probePort" -}}
{{- if include "altan.usesTls" . -}}
{{- .ctx.Values.tls.healthPort -}}
{{- else -}}
{{- (index .ctx.Values .component).port -}}
{{- end -}}
{{- end -}}

{{/* The container port of the plaintext health checks, with mTLS. */}}
{{- define "altan.healthContainerPort" -}}
{{- if include "altan.usesTls" . }}
- name: health
  containerPort: {{ .ctx.Values.tls.healthPort }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/* The container port "metrics" of a component with a metrics.port: (dict "ctx" $ "component" "agent"). */}}
{{- define "altan.metricsContainerPort" -}}
{{- with (index .ctx.Values .component).metrics.port }}
- name: metrics
  containerPort: {{ . }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/* ALTAN_<COMPONENT>_METRICS_PORT of a component with a metrics.port: (dict "ctx" $ "component" "agent"). */}}
{{- define "altan.metricsEnv" -}}
{{- with (index .ctx.Values .component).metrics.port }}
- name: ALTAN_{{ upper $.component }}_METRICS_PORT
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
NetworkPolicy ingress rule of a component's metrics port: only the peers networkPolicy.metrics.from names (never
everyone: the guards refuse such a peer); nothing when the port is not served or nobody is named.
*/}}
{{- define "altan.metricsIngressRule" -}}
{{- $port := (index .ctx.Values .component).metrics.port -}}
{{- if and $port .ctx.Values.networkPolicy.metrics.from }}
# The metrics port, only from the scrapers networkPolicy.metrics.from names.
- from:
    {{- toYaml .ctx.Values.networkPolicy.metrics.from | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ $port }}
{{- end }}
{{- end -}}

{{/*
The OTEL_* variables of a service (telemetry.*), read by altan.telemetry at start-up; nothing without an endpoint, so
tracing stays off. service.name is set by each service itself (altan-<service>).
*/}}
{{- define "altan.telemetryEnv" -}}
{{- $t := .Values.telemetry -}}
{{- if $t.otlp.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlp.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $t.otlp.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $t.sampler | quote }}
{{- if eq $t.sampler "parentbased_traceidratio" }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.samplerArg | toString | quote }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s" .Release.Namespace | quote }}
{{- end }}
{{- if $t.propagateOutbound }}
- name: ALTAN_TRACE_PROPAGATE_OUTBOUND
  value: "true"
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rules from a list of {cidr, ports} or {to, ports}: integrator.llmEgress, telemetry.otlp.egress. */}}
{{- define "altan.extraEgressRules" -}}
{{- range . }}
- to:
    {{- if .cidr }}
    - ipBlock:
        cidr: {{ .cidr }}
    {{- else }}
    {{- toYaml .to | nindent 4 }}
    {{- end }}
  ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rules of every service to the OTLP collector (telemetry.otlp.egress), when tracing is on. */}}
{{- define "altan.telemetryEgressRules" -}}
{{- if .Values.telemetry.otlp.endpoint }}
{{- with .Values.telemetry.otlp.egress }}
# Spans, to the OTLP collector (telemetry.otlp.egress).
{{- include "altan.extraEgressRules" . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rule of an Istio sidecar to istiod (certificates and configuration, port 15012). */}}
{{- define "altan.meshEgressRule" -}}
{{- if .Values.mesh.istio.enabled }}
# The Istio sidecar's certificates and configuration come from istiod.
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Values.mesh.istio.istiodNamespace }}
      {{- with .Values.mesh.istio.istiodLabels }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
  ports:
    - protocol: TCP
      port: 15012
{{- end }}
{{- end -}}

{{/*
The metrics endpoints of the install, one per component that serves them: (component, Service port name, path).
The gateway serves /metrics on its REST port; a service with a metrics.port serves it there.
*/}}
{{- define "altan.metricsEndpoints" -}}
- {component: gateway, port: http}
{{- range $component := list "agent" "tool" "integrator" }}
{{- if dig "metrics" "port" nil (index $.Values $component) }}
- {component: {{ $component }}, port: metrics}
{{- end }}
{{- end }}
{{- end -}}
