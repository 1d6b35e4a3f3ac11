{{/*
Objects every service component has in the same shape: ServiceAccount, Service, HorizontalPodAutoscaler and
PodDisruptionBudget. Each takes (dict "ctx" $ "component" "agent") and reads .Values.<component>.
*/}}

{{/* ServiceAccount, with the Workload Identity binding when a Google service account is configured. */}}
{{- define "altan.serviceAccount" -}}
{{- $v := index .ctx.Values .component -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "altan.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "altan.componentLabels" . | nindent 4 }}
  {{- with $v.serviceAccount.gcpServiceAccount }}
  annotations:
    iam.gke.io/gcp-service-account: {{ . | quote }}
  {{- end }}
# Pods opt in to a token explicitly (only the tool service, for discovery).
automountServiceAccountToken: false
{{- end -}}

{{/* ClusterIP Service of a component; ports is a list of (dict "name" "grpc" "port" 50061). */}}
{{- define "altan.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "altan.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "altan.componentLabels" . | nindent 4 }}
spec:
  type: ClusterIP
  {{- if .headless }}
  # Headless: clients resolve every pod and balance gRPC calls across them (round robin), instead of pinning
  # one long-lived HTTP/2 connection to a single pod behind a virtual IP.
  clusterIP: None
  {{- end }}
  selector:
    {{- include "altan.selectorLabels" . | nindent 4 }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
    {{- end }}
{{- end -}}

{{/* HorizontalPodAutoscaler on CPU and memory; extraMetrics (YAML list text) is appended. */}}
{{- define "altan.hpa" -}}
{{- $a := (index .ctx.Values .component).autoscaling -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "altan.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "altan.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "altan.componentName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $a.targetMemoryUtilizationPercentage }}
    {{- with .extraMetrics }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* PodDisruptionBudget of a component. */}}
{{- define "altan.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "altan.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "altan.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ (index .ctx.Values .component).pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "altan.selectorLabels" . | nindent 6 }}
{{- end -}}
