{{/*
Names, labels and the shared pieces of the pod specs. The environment variable names follow
docs/cli-contract.md: LAYERKV_ + the flag name in upper case.
*/}}

{{- define "layerkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "layerkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "layerkv.schedulerName" -}}{{ include "layerkv.fullname" . }}-scheduler{{- end }}
{{- define "layerkv.workersName" -}}{{ include "layerkv.fullname" . }}-workers{{- end }}
{{- define "layerkv.redisName" -}}{{ include "layerkv.fullname" . }}-redis{{- end }}
{{- define "layerkv.policyName" -}}{{ include "layerkv.fullname" . }}-policy{{- end }}
{{- define "layerkv.authSecretName" -}}
{{- default (printf "%s-auth" (include "layerkv.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "layerkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "layerkv.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "layerkv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "layerkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" . "component" "scheduler"). */}}
{{- define "layerkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "layerkv.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "layerkv.componentLabels" -}}
{{ include "layerkv.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference; call with (dict "ctx" . "image" .Values.scheduler.image). */}}
{{- define "layerkv.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Host name (no port) of the scheduler Service inside the cluster. */}}
{{- define "layerkv.schedulerHost" -}}
{{- printf "%s.%s.svc.%s" (include "layerkv.schedulerName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* Domain of the workers' headless Service: each pod is <pod name>.<this>. */}}
{{- define "layerkv.workersDomain" -}}
{{- printf "%s.%s.svc.%s" (include "layerkv.workersName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The Redis URL as an EnvVar (plain value, or from a Secret). */}}
{{- define "layerkv.redisUrlEnv" -}}
- name: LAYERKV_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s:6379/0" (include "layerkv.redisName" .) | quote }}
{{- else if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else }}
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- end }}

{{/* TLS EnvVars of one component; call with (dict "ctx" . "component" "scheduler"). */}}
{{- define "layerkv.tlsEnv" -}}
{{- if .ctx.Values.tls.enabled }}
- name: LAYERKV_TLS_CERT
  value: /etc/layerkv/tls/tls.crt
- name: LAYERKV_TLS_KEY
  value: /etc/layerkv/tls/tls.key
{{- if .ctx.Values.tls.mutual }}
- name: LAYERKV_TLS_CA
  value: /etc/layerkv/tls/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/* The admin token EnvVar (scheduler: required on Admin; worker: used to self-register). */}}
{{- define "layerkv.adminTokenEnv" -}}
{{- if .Values.auth.enabled }}
- name: LAYERKV_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "layerkv.authSecretName" . }}
      key: {{ .Values.auth.adminTokenKey }}
{{- end }}
{{- if and .Values.auth.enabled .Values.auth.requireWorkerToken }}
- name: LAYERKV_WORKER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "layerkv.authSecretName" . }}
      key: {{ .Values.auth.workerTokenKey }}
{{- end }}
{{- end }}

{{/*
Liveness/readiness/startup probe handler. Without TLS: the kubelet's native gRPC probe on the
standard grpc.health.v1 service. With TLS the kubelet cannot speak TLS to a gRPC probe, so the
image's health check script runs inside the container with the pod's own certificate.
Call with (dict "ctx" . "port" <int>).
*/}}
{{- define "layerkv.probeHandler" -}}
{{- if .ctx.Values.tls.enabled }}
exec:
  command: ["python", "/opt/layerkv/healthcheck.py"]
{{- else }}
grpc:
  port: {{ .port }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express with a readable message. Included by every
workload template, so `helm template` and `helm install` stop with the message.
*/}}
{{- define "layerkv.validate" -}}
{{- $v := .Values }}
{{- if and (not $v.redis.enabled) (not $v.redis.url) (not $v.redis.existingSecret) }}
{{- fail "redis.enabled is false: set redis.url (redis:// or rediss://) or redis.existingSecret to use an external Redis" }}
{{- end }}
{{- if and $v.redis.enabled (or $v.redis.url $v.redis.existingSecret) }}
{{- fail "redis.url/redis.existingSecret are set but redis.enabled is true: set redis.enabled=false to use an external Redis" }}
{{- end }}
{{- if and (eq $v.workers.device "cuda") (lt (int $v.workers.gpus) 1) }}
{{- fail "workers.device is cuda but workers.gpus is 0: request at least one GPU or set workers.device=cpu" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.kv.gpuBlocks)) (not (kindIs "invalid" $v.kv.gpuGiB)) }}
{{- fail "kv.gpuBlocks and kv.gpuGiB are both set: size the GPU tier one way only" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.kv.hostBlocks)) (not (kindIs "invalid" $v.kv.hostGiB)) }}
{{- fail "kv.hostBlocks and kv.hostGiB are both set: size the host tier one way only" }}
{{- end }}
{{- if $v.model.volume.enabled }}
{{- if eq (len (compact (list $v.model.volume.existingClaim $v.model.volume.hostPath))) 0 }}
{{- fail "model.volume.enabled is true: set model.volume.existingClaim or model.volume.hostPath" }}
{{- end }}
{{- if and $v.model.volume.existingClaim $v.model.volume.hostPath }}
{{- fail "model.volume.existingClaim and model.volume.hostPath are both set: choose one" }}
{{- end }}
{{- end }}
{{- if $v.tls.enabled }}
{{- if or (not $v.tls.schedulerSecret) (not $v.tls.workerSecret) }}
{{- fail "tls.enabled is true: set tls.schedulerSecret and tls.workerSecret (kubernetes.io/tls Secrets with tls.crt, tls.key, ca.crt)" }}
{{- end }}
{{- if ne $v.workers.discovery "register" }}
{{- fail (printf "tls.enabled needs workers.discovery=register (got %q): DNS discovery dials pod IPs that no certificate names" $v.workers.discovery) }}
{{- end }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.adminToken) }}
{{- fail "auth.enabled is true: set auth.existingSecret or auth.adminToken" }}
{{- end }}
{{- if and $v.auth.enabled $v.auth.requireApiToken (not $v.auth.existingSecret) (not $v.auth.apiToken) }}
{{- fail "auth.requireApiToken is true: set auth.existingSecret or auth.apiToken" }}
{{- end }}
{{- if and $v.auth.enabled $v.auth.requireWorkerToken (not $v.auth.existingSecret) (not $v.auth.workerToken) }}
{{- fail "auth.requireWorkerToken is true: set auth.existingSecret or auth.workerToken" }}
{{- end }}
{{- end }}
