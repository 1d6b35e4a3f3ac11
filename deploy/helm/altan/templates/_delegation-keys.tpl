{{/*
The key pair of task delegations (ES256): the agent signs each queued task's delegation token with the private key,
mounted from a Secret into the agent only; the agent, tool and integrator services and the tool containers verify
them with the public key(s), mounted from a ConfigMap; the gateway gets neither (it never accepts a delegation).
*/}}

{{/* The Secret holding the agent's private key (signing-key.pem): delegationKeys.existingSecret, or the generated one. */}}
{{- define "altan.delegationKeySecretName" -}}
{{- if .Values.delegationKeys.existingSecret -}}
{{- .Values.delegationKeys.existingSecret -}}
{{- else -}}
{{- printf "%s-delegation-signing-key" (include "altan.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap holding the verifiers' public keys (public-keys.pem). */}}
{{- define "altan.delegationPublicKeysName" -}}
{{- printf "%s-delegation-public-keys" (include "altan.fullname" .) -}}
{{- end -}}

{{/* Where the files are mounted. */}}
{{- define "altan.delegationSigningKeyFile" -}}/etc/altan/delegation-signing/signing-key.pem{{- end -}}
{{- define "altan.delegationPublicKeysFile" -}}/etc/altan/delegation-public/public-keys.pem{{- end -}}

{{/* The env entries of a component (takes (dict "ctx" $ "component" "agent")): the agent both files, the other
services and the tool containers the public keys only, the gateway nothing. */}}
{{- define "altan.delegationEnv" -}}
{{- if ne .component "gateway" }}
- name: ALTAN_DELEGATION_PUBLIC_KEYS_FILE
  value: {{ include "altan.delegationPublicKeysFile" . | quote }}
{{- end }}
{{- if eq .component "agent" }}
- name: ALTAN_DELEGATION_SIGNING_KEY_FILE
  value: {{ include "altan.delegationSigningKeyFile" . | quote }}
{{- end }}
{{- end -}}

{{/* Their volume mounts. */}}
{{- define "altan.delegationVolumeMounts" -}}
{{- if ne .component "gateway" }}
- name: delegation-public-keys
  mountPath: /etc/altan/delegation-public
  readOnly: true
{{- end }}
{{- if eq .component "agent" }}
- name: delegation-signing-key
  mountPath: /etc/altan/delegation-signing
  readOnly: true
{{- end }}
{{- end -}}

{{/* Their volumes. */}}
{{- define "altan.delegationVolumes" -}}
{{- if ne .component "gateway" }}
- name: delegation-public-keys
  configMap:
    name: {{ include "altan.delegationPublicKeysName" .ctx }}
{{- end }}
{{- if eq .component "agent" }}
# The private key, and only it, of the Secret (an operator's may hold more keys).
- name: delegation-signing-key
  secret:
    secretName: {{ include "altan.delegationKeySecretName" .ctx }}
    defaultMode: 0440
    items:
      - key: signing-key.pem
        path: signing-key.pem
{{- end }}
{{- end -}}

{{/* A pod annotation that rolls the pods holding delegation keys when delegationKeys changes (a rotation). A
generated key is not seen here: roll with `kubectl rollout restart` after replacing it (docs/operations.md). */}}
{{- define "altan.delegationChecksum" -}}
{{- if ne .component "gateway" }}
checksum/delegation-keys: {{ .ctx.Values.delegationKeys | toJson | sha256sum }}
{{- end }}
{{- end -}}
