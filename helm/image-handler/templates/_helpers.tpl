{{/* Names, labels and shared pieces of the image handler chart. */}}

{{- define "image-handler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; objects add -scanner, -metrics, ... (kept within 63 chars). */}}
{{- define "image-handler.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "image-handler.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "handler"). */}}
{{- define "image-handler.labels" -}}
helm.sh/chart: {{ include "image-handler.chart" .ctx }}
{{ include "image-handler.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: image-handler
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "image-handler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "image-handler.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "image-handler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "image-handler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; call with (dict "image" .Values.image "ctx" $). */}}
{{- define "image-handler.image" -}}
{{- $repository := .image.repository | default .ctx.Values.image.repository }}
{{- $digest := .image.digest | default "" }}
{{- if and (not .image.repository) (not $digest) }}
{{- $digest = .ctx.Values.image.digest }}
{{- end }}
{{- if $digest }}
{{- printf "%s@%s" $repository $digest }}
{{- else }}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/* The gRPC address scanners dial: the handler's Service. */}}
{{- define "image-handler.grpcAddress" -}}
{{- printf "%s.%s.svc:%d" (include "image-handler.fullname" .) .Release.Namespace (int .Values.handler.grpcPort) }}
{{- end }}

{{/* Environment variables read from Secrets; call with a map NAME -> {name, key}. */}}
{{- define "image-handler.secretEnv" -}}
{{- range $variable, $ref := . }}
- name: {{ $variable }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}

{{/* A number as the handler's flags read it: integers without an exponent, floats as given. */}}
{{- define "image-handler.float" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ float64 . }}{{ end }}
{{- end }}

{{/* "true" when the handler speaks TLS (handler.tls.certSecret, or tls_cert in extraConfig). */}}
{{- define "image-handler.tlsEnabled" -}}
{{- if or .Values.handler.tls.certSecret .Values.handler.extraConfig.tls_cert }}true{{ end }}
{{- end }}

{{/*
checkov skips of a workload, each with its reason (docs/operating/helm.md#policy-scanners), and
only while it applies: call with (dict "ctx" $ "image" .Values.image "resources" ...).
*/}}
{{- define "image-handler.checkovSkips" -}}
{{- $n := 0 }}
{{- if not (dig "limits" "cpu" "" .resources) }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: "CKV_K8S_11=No CPU limit by design: CFS throttling stalls the event loop (heartbeats included); the request reserves the CPU"
{{- end }}
{{- if ne .ctx.Values.image.pullPolicy "Always" }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: "CKV_K8S_15=IfNotPresent by design: a pinned digest is exact, and Always makes every start depend on the registry"
{{- end }}
{{- if not (contains "@sha256:" (include "image-handler.image" (dict "image" .image "ctx" .ctx))) }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: "CKV_K8S_43=Not pinned yet: set image.digest (a chart default cannot know your build's digest)"
{{- end }}
{{- end }}

{{/*
The job policy's settings as environment variables for the handler (prefix IMAGE_HANDLER_) or
the scanners (IMAGE_SCANNER_): the same rules on both sides.
*/}}
{{- define "image-handler.jobPolicyEnv" -}}
{{- $p := .ctx.Values.jobPolicy -}}
{{ .prefix }}ALLOWED_REGISTRIES: {{ join "," $p.allowedRegistries | quote }}
{{ .prefix }}ALLOWED_ARTIFACT_URLS: {{ join "," $p.allowedArtifactUrls | quote }}
{{ .prefix }}ALLOWED_NETWORKS: {{ join "," $p.allowedNetworks | quote }}
{{ .prefix }}ARTIFACT_ROOTS: {{ join "," $p.artifactRoots | quote }}
{{ .prefix }}NODE_ROOTS: {{ join "," $p.nodeRoots | quote }}
{{- if $p.credentialGrants }}
{{ .prefix }}CREDENTIAL_GRANTS: "/etc/image-handler/grants/grants.json"
{{- end }}
{{- end -}}
