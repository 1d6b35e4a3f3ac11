{{/*
ALTAN_INTERNAL_KEY: the agent signs each queued task's delegation token with it, and the agent, tool and integrator
services and the tool containers verify those tokens (never the gateway, which only forwards callers' own tokens).
*/}}

{{/* The Secret holding ALTAN_INTERNAL_KEY: internalKey.existingSecret, or the one the chart generates. */}}
{{- define "altan.internalKeySecretName" -}}
{{- if .Values.internalKey.existingSecret -}}
{{- .Values.internalKey.existingSecret -}}
{{- else -}}
{{- printf "%s-internal-key" (include "altan.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The env entry of ALTAN_INTERNAL_KEY, by secretKeyRef; takes the root context. */}}
{{- define "altan.internalKeyEnv" -}}
- name: ALTAN_INTERNAL_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "altan.internalKeySecretName" . }}
      key: ALTAN_INTERNAL_KEY
      optional: false
{{- end -}}
