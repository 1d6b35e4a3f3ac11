{{/*
The install's alerts, as rule groups: rendered into a PrometheusRule (prometheus-operator) and a Rules object (GKE's
managed Prometheus). Every selector names the release namespace, so that one tenant's install alerts on its own
series only, and no alert groups by a label whose values a tenant chooses. The metrics and their labels are listed
in docs/operations.md ("Metrics the alerts read"); tests/deploy/test_monitoring.py parses every expression.
*/}}
{{- define "altan.alertGroups" -}}
{{- $r := .Values.monitoring.prometheusRule -}}
{{- $ns := printf "namespace=%q" .Release.Namespace -}}
{{- $jobs := printf "job=~%q" (printf "%s-(gateway|agent|tool|integrator)" (include "altan.fullname" .)) -}}
{{- $failed := "grpc_code=~\"Unknown|Internal|Unavailable|DataLoss|DeadlineExceeded\"" -}}
{{- $spike := $r.outboundSpike -}}
{{- $labels := $r.alertLabels -}}
- name: {{ include "altan.fullname" . }}.availability
  rules:
    - alert: AltanTargetDown
      expr: up{ {{- $ns }}, {{ $jobs -}} } == 0
      for: 5m
      labels:
        severity: critical
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{ "{{ $labels.job }}" }} of the altan install in {{ .Release.Namespace }} cannot be scraped"
        description: "Prometheus has not reached {{ "{{ $labels.instance }}" }} for 5 minutes: the pod is down, or a NetworkPolicy (networkPolicy.metrics.from) blocks the scrape."
    - alert: AltanGrpcErrorRate
      expr: |-
        sum by (namespace, job, grpc_service) (rate(altan_grpc_server_handled_total{ {{- $ns }}, {{ $failed -}} }[5m]))
          / sum by (namespace, job, grpc_service) (rate(altan_grpc_server_handled_total{ {{- $ns -}} }[5m]))
          > {{ $r.errorRatio }}
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{ "{{ $labels.grpc_service }}" }} fails {{ "{{ $value | humanizePercentage }}" }} of its calls"
        description: "More than {{ $r.errorRatio }} of the gRPC calls served by {{ "{{ $labels.job }}" }} in {{ .Release.Namespace }} end in Unknown, Internal, Unavailable, DataLoss or DeadlineExceeded."
    - alert: AltanRestErrorRate
      expr: |-
        sum by (namespace, job) (rate(altan_http_requests_total{ {{- $ns }}, status=~"5.."}[5m]))
          / sum by (namespace, job) (rate(altan_http_requests_total{ {{- $ns -}} }[5m]))
          > {{ $r.errorRatio }}
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "The REST API of the altan install in {{ .Release.Namespace }} answers 5xx to {{ "{{ $value | humanizePercentage }}" }} of requests"
        description: "More than {{ $r.errorRatio }} of the gateway's REST requests end in a 5xx status (503: a service behind it is unavailable)."
    - alert: AltanLlmErrorRate
      expr: |-
        sum by (namespace, provider) (rate(altan_llm_calls_total{ {{- $ns }}, outcome!="ok"}[10m]))
          / sum by (namespace, provider) (rate(altan_llm_calls_total{ {{- $ns -}} }[10m]))
          > {{ $r.errorRatio }}
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "LLM calls to {{ "{{ $labels.provider }}" }} fail {{ "{{ $value | humanizePercentage }}" }} of the time"
        description: "More than {{ $r.errorRatio }} of the model turns sent to {{ "{{ $labels.provider }}" }} from {{ .Release.Namespace }} failed after their retries."
- name: {{ include "altan.fullname" . }}.latency
  rules:
    - alert: AltanGrpcLatencyP99
      expr: |-
        histogram_quantile(0.99, sum by (namespace, job, le) (rate(altan_grpc_server_handling_seconds_bucket{ {{- $ns }}, grpc_type="unary"}[5m])))
          > {{ $r.latencyP99Seconds }}
      for: 15m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "p99 of {{ "{{ $labels.job }}" }}'s unary gRPC calls is {{ "{{ $value | humanizeDuration }}" }}"
        description: "The slowest 1 % of unary calls served by {{ "{{ $labels.job }}" }} in {{ .Release.Namespace }} take more than {{ $r.latencyP99Seconds }} s (model turns and third-party calls included: compare with the LLM and tool latencies on the dashboard)."
    - alert: AltanRestLatencyP99
      expr: |-
        histogram_quantile(0.99, sum by (namespace, job, le) (rate(altan_http_request_duration_seconds_bucket{ {{- $ns }}, route!~".*/events"}[5m])))
          > {{ $r.latencyP99Seconds }}
      for: 15m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "p99 of the REST API of the altan install in {{ .Release.Namespace }} is {{ "{{ $value | humanizeDuration }}" }}"
        description: "The slowest 1 % of REST requests (event streams excluded) take more than {{ $r.latencyP99Seconds }} s."
- name: {{ include "altan.fullname" . }}.abuse
  rules:
    - alert: AltanToolCallSpike
      expr: |-
        sum by (namespace) (rate(altan_tool_calls_total{ {{- $ns -}} }[10m]))
          > {{ $spike.factor }} * sum by (namespace) (rate(altan_tool_calls_total{ {{- $ns -}} }[1d]))
        and sum by (namespace) (rate(altan_tool_calls_total{ {{- $ns -}} }[10m])) > {{ $spike.minPerSecond }}
      for: 5m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "Tool calls of the altan install in {{ .Release.Namespace }} are {{ $spike.factor }}x their daily rate"
        description: "Outbound tool calls run at {{ "{{ $value | humanize }}" }}/s, more than {{ $spike.factor }} times their rate over the last day: someone may be using the tenant's keys or tools far more than usual (GET /v1/audit names the tools and users)."
    - alert: AltanLlmCallSpike
      expr: |-
        sum by (namespace) (rate(altan_llm_calls_total{ {{- $ns -}} }[10m]))
          > {{ $spike.factor }} * sum by (namespace) (rate(altan_llm_calls_total{ {{- $ns -}} }[1d]))
        and sum by (namespace) (rate(altan_llm_calls_total{ {{- $ns -}} }[10m])) > {{ $spike.minPerSecond }}
      for: 5m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "LLM calls of the altan install in {{ .Release.Namespace }} are {{ $spike.factor }}x their daily rate"
        description: "Model calls run at {{ "{{ $value | humanize }}" }}/s, more than {{ $spike.factor }} times their rate over the last day: check the token spend and GET /v1/audit."
    - alert: AltanEgressRefusalSpike
      expr: sum by (namespace) (increase(altan_egress_refused_total{ {{- $ns -}} }[10m])) > {{ $r.egressRefusals }}
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{ "{{ $value | humanize }}" }} outbound calls refused by the egress guard in 10 minutes ({{ .Release.Namespace }})"
        description: "Tools or agents keep aiming at private, loopback or metadata addresses: probing from inside the install (GET /v1/audit, outcome refused)."
    - alert: AltanAuthFailureSpike
      expr: sum by (namespace, service) (increase(altan_auth_failures_total{ {{- $ns -}} }[10m])) > {{ $r.authFailures }}
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{ "{{ $value | humanize }}" }} failed authentications at the {{ "{{ $labels.service }}" }} in 10 minutes ({{ .Release.Namespace }})"
        description: "Bad, expired or foreign tokens keep arriving: a leaked or guessed token, or a client with a stale one."
- name: {{ include "altan.fullname" . }}.work
  rules:
    - alert: AltanTaskQueueBacklog
      expr: max by (namespace) (altan_task_queue_depth{ {{- $ns -}} }) > {{ $r.queueBacklog }}
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{ "{{ $value | humanize }}" }} tasks are waiting in the altan install in {{ .Release.Namespace }}"
        description: "The agents do not keep up with the tasks submitted: scale the agent (agent.autoscaling), or look for a slow LLM or tool."
    - alert: AltanCredentialNeedsReauth
      expr: max by (namespace) (altan_credentials_needs_reauth{ {{- $ns -}} }) > 0
      for: 5m
      labels:
        severity: info
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{ "{{ $value | humanize }}" }} OAuth2 credentials of the altan install in {{ .Release.Namespace }} need to be authorized again"
        description: "A provider refused their refresh token: tasks that use them fail until an admin runs POST /v1/credentials/{name}/authorize (GET /v1/credentials lists them with status needs_reauth)."
    - alert: AltanCredentialRefreshFailures
      expr: sum by (namespace) (increase(altan_credential_refresh_total{ {{- $ns }}, outcome!="ok"}[30m])) > 0
      labels:
        severity: info
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "OAuth2 token refreshes fail in the altan install in {{ .Release.Namespace }}"
        description: "{{ "{{ $value | humanize }}" }} refreshes failed in 30 minutes: a provider is down or refuses the install's client."
{{- end -}}
